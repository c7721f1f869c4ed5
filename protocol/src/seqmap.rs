//! [`SeqMap`]: a map keyed by block seq, ordered like a `BTreeMap`.
//!
//! A peer's cache holds a run of recent seqs with few gaps, and every block
//! that arrives looks it up several times. A ring indexed by `seq - base`
//! answers in one step where a tree walks nodes that are rarely in the CPU's
//! cache. Keys far apart (a replayed ancient block, say) would make the ring
//! long, so past [`SPAN_LIMIT`] slots the map moves into a `BTreeMap` and
//! stays there until it is empty: memory stays bounded by what is stored.

use std::collections::{btree_map, vec_deque, BTreeMap, VecDeque};
use std::iter::Enumerate;

use crate::prefetch;

/// Most slots the ring spans (present or not) before the map becomes a tree.
pub const SPAN_LIMIT: u64 = 8192;

/// An ordered map from seq to `V`.
#[derive(Debug, Clone)]
pub struct SeqMap<V> {
    inner: Inner<V>,
    len: usize,
}

#[derive(Debug, Clone)]
enum Inner<V> {
    /// Slot `i` holds key `base + i`; the first and last slots are occupied
    /// whenever the map is not empty.
    Ring {
        base: u64,
        slots: VecDeque<Option<V>>,
    },
    Tree(BTreeMap<u64, V>),
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        SeqMap {
            inner: Inner::Ring {
                base: 0,
                slots: VecDeque::new(),
            },
            len: 0,
        }
    }
}

impl<V> SeqMap<V> {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The value of `seq`.
    #[must_use]
    pub fn get(&self, seq: u64) -> Option<&V> {
        match &self.inner {
            Inner::Ring { base, slots } => {
                let i = seq.checked_sub(*base)?;
                slots.get(usize::try_from(i).ok()?)?.as_ref()
            }
            Inner::Tree(t) => t.get(&seq),
        }
    }

    /// Prefetches the slot of `seq` (see [`crate::prefetch`]).
    pub fn prefetch(&self, seq: u64) {
        if let Inner::Ring { base, slots } = &self.inner {
            let Some(i) = seq.checked_sub(*base).and_then(|i| usize::try_from(i).ok()) else {
                return;
            };
            let (a, b) = slots.as_slices();
            match i.checked_sub(a.len()) {
                None => prefetch::at(a, i),
                Some(j) => prefetch::at(b, j),
            }
        }
    }

    /// The value of `seq`, mutable.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        match &mut self.inner {
            Inner::Ring { base, slots } => {
                let i = seq.checked_sub(*base)?;
                slots.get_mut(usize::try_from(i).ok()?)?.as_mut()
            }
            Inner::Tree(t) => t.get_mut(&seq),
        }
    }

    /// Whether `seq` has a value.
    #[must_use]
    pub fn contains_key(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Sets the value of `seq`, returning the old one.
    pub fn insert(&mut self, seq: u64, v: V) -> Option<V> {
        if let Inner::Ring { base, slots } = &mut self.inner {
            let fits = match slots.len() {
                0 => {
                    *base = seq;
                    true
                }
                n => {
                    // The last slot holds a key, so this does not overflow.
                    let last = *base + (n as u64 - 1);
                    last.max(seq) - (*base).min(seq) < SPAN_LIMIT
                }
            };
            if fits {
                while *base > seq {
                    slots.push_front(None);
                    *base -= 1;
                }
                let i = (seq - *base) as usize;
                if i >= slots.len() {
                    slots.resize_with(i + 1, || None);
                }
                let old = slots[i].replace(v);
                if old.is_none() {
                    self.len += 1;
                }
                return old;
            }
            self.make_tree();
        }
        let Inner::Tree(t) = &mut self.inner else {
            unreachable!("the ring returned above")
        };
        let old = t.insert(seq, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn make_tree(&mut self) {
        let Inner::Ring { base, slots } = &mut self.inner else {
            return;
        };
        let base = *base;
        let tree = std::mem::take(slots)
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| Some((base + i as u64, v?)))
            .collect();
        self.inner = Inner::Tree(tree);
    }

    /// Removes `seq`, returning its value.
    pub fn remove(&mut self, seq: u64) -> Option<V> {
        let old = match &mut self.inner {
            Inner::Ring { base, slots } => {
                let i = usize::try_from(seq.checked_sub(*base)?).ok()?;
                let old = slots.get_mut(i)?.take()?;
                trim(base, slots);
                old
            }
            Inner::Tree(t) => t.remove(&seq)?,
        };
        self.len -= 1;
        self.reset_if_empty();
        Some(old)
    }

    /// Removes the entry with the lowest seq.
    pub fn pop_first(&mut self) -> Option<(u64, V)> {
        let first = match &mut self.inner {
            Inner::Ring { base, slots } => {
                let v = slots.pop_front()??;
                let seq = *base;
                *base += 1;
                trim(base, slots);
                (seq, v)
            }
            Inner::Tree(t) => t.pop_first()?,
        };
        self.len -= 1;
        self.reset_if_empty();
        Some(first)
    }

    fn reset_if_empty(&mut self) {
        if self.len == 0 && matches!(self.inner, Inner::Tree(_)) {
            *self = Self::default();
        }
    }

    /// The lowest seq.
    #[must_use]
    pub fn first_key(&self) -> Option<u64> {
        self.iter().next().map(|(s, _)| s)
    }

    /// The highest seq.
    #[must_use]
    pub fn last_key(&self) -> Option<u64> {
        self.iter().next_back().map(|(s, _)| s)
    }

    /// The entries in seq order.
    #[must_use]
    pub fn iter(&self) -> Iter<'_, V> {
        match &self.inner {
            Inner::Ring { base, slots } => Iter::Ring(*base, slots.iter().enumerate()),
            Inner::Tree(t) => Iter::Tree(t.range(..)),
        }
    }

    /// The entries in seq order, values mutable.
    pub fn iter_mut(&mut self) -> IterMut<'_, V> {
        match &mut self.inner {
            Inner::Ring { base, slots } => IterMut::Ring(*base, slots.iter_mut().enumerate()),
            Inner::Tree(t) => IterMut::Tree(t.iter_mut()),
        }
    }

    /// The seqs in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.iter().map(|(s, _)| s)
    }

    /// The seqs below `end`, in order.
    pub fn keys_below(&self, end: u64) -> impl DoubleEndedIterator<Item = u64> + '_ {
        let it = match end.checked_sub(1) {
            Some(hi) => self.range(0, hi),
            None => self.range(1, 0),
        };
        it.map(|(s, _)| s)
    }

    /// The entries with `lo <= seq <= hi`, in seq order.
    #[must_use]
    pub fn range(&self, lo: u64, hi: u64) -> Iter<'_, V> {
        match &self.inner {
            Inner::Ring { base, slots } => {
                // Slot indices, end exclusive; no key arithmetic can overflow.
                let n = slots.len();
                let from = usize::try_from(lo.saturating_sub(*base)).map_or(n, |i| i.min(n));
                let to = if hi < *base {
                    0
                } else {
                    usize::try_from((hi - *base).saturating_add(1)).map_or(n, |i| i.min(n))
                };
                let to = to.max(from);
                Iter::Ring(
                    base.wrapping_add(from as u64),
                    slots.range(from..to).enumerate(),
                )
            }
            Inner::Tree(t) if lo <= hi => Iter::Tree(t.range(lo..=hi)),
            Inner::Tree(t) => Iter::Tree(t.range(1..1)),
        }
    }
}

/// Drops empty slots at both ends of the ring.
fn trim<V>(base: &mut u64, slots: &mut VecDeque<Option<V>>) {
    while matches!(slots.front(), Some(None)) {
        slots.pop_front();
        *base += 1;
    }
    while matches!(slots.back(), Some(None)) {
        slots.pop_back();
    }
}

/// Iterator over a [`SeqMap`]'s entries, in seq order.
#[derive(Debug)]
pub enum Iter<'a, V> {
    /// Ring slots, the first at the given key.
    #[doc(hidden)]
    Ring(u64, Enumerate<vec_deque::Iter<'a, Option<V>>>),
    /// Tree entries.
    #[doc(hidden)]
    Tree(btree_map::Range<'a, u64, V>),
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (u64, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Ring(base, it) => it.find_map(|(i, v)| Some((*base + i as u64, v.as_ref()?))),
            Iter::Tree(it) => it.next().map(|(k, v)| (*k, v)),
        }
    }
}

impl<V> DoubleEndedIterator for Iter<'_, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Ring(base, it) => it
                .by_ref()
                .rev()
                .find_map(|(i, v)| Some((*base + i as u64, v.as_ref()?))),
            Iter::Tree(it) => it.next_back().map(|(k, v)| (*k, v)),
        }
    }
}

/// Iterator over a [`SeqMap`]'s entries with mutable values, in seq order.
#[derive(Debug)]
pub enum IterMut<'a, V> {
    /// Ring slots, the first at the given key.
    #[doc(hidden)]
    Ring(u64, Enumerate<vec_deque::IterMut<'a, Option<V>>>),
    /// Tree entries.
    #[doc(hidden)]
    Tree(btree_map::IterMut<'a, u64, V>),
}

impl<'a, V> Iterator for IterMut<'a, V> {
    type Item = (u64, &'a mut V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IterMut::Ring(base, it) => it.find_map(|(i, v)| Some((*base + i as u64, v.as_mut()?))),
            IterMut::Tree(it) => it.next().map(|(k, v)| (*k, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        PopFirst,
        Bump(u64),
        BumpAll,
    }

    fn op(spread: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..spread, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0..spread).prop_map(Op::Remove),
            1 => Just(Op::PopFirst),
            1 => (0..spread).prop_map(Op::Bump),
            1 => Just(Op::BumpAll),
        ]
    }

    fn check(m: &SeqMap<u32>, t: &BTreeMap<u64, u32>, probe: u64) {
        assert_eq!(m.len(), t.len());
        let all: Vec<_> = m.iter().map(|(k, v)| (k, *v)).collect();
        let want: Vec<_> = t.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(all, want);
        let back: Vec<_> = m.iter().rev().map(|(k, _)| k).collect();
        let want_back: Vec<_> = t.keys().rev().copied().collect();
        assert_eq!(back, want_back);
        assert_eq!(m.first_key(), t.keys().next().copied());
        assert_eq!(m.last_key(), t.keys().next_back().copied());
        assert_eq!(m.get(probe), t.get(&probe));
        // A hint: any key, in either form of the map, must not panic.
        for k in [probe, 0, m.first_key().unwrap_or(0), u64::MAX] {
            m.prefetch(k);
        }
        let lo = probe / 2;
        let hi = probe + 7;
        let r: Vec<_> = m.range(lo, hi).map(|(k, _)| k).collect();
        let want_r: Vec<_> = t.range(lo..=hi).map(|(k, _)| *k).collect();
        assert_eq!(r, want_r);
        let r2: Vec<_> = m.range(lo, hi).rev().map(|(k, _)| k).collect();
        let want_r2: Vec<_> = t.range(lo..=hi).rev().map(|(k, _)| *k).collect();
        assert_eq!(r2, want_r2);
        assert_eq!(m.range(hi, lo).count(), 0);
        let below: Vec<_> = m.keys_below(probe).collect();
        let want_below: Vec<_> = t.range(..probe).map(|(k, _)| *k).collect();
        assert_eq!(below, want_below);
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            t.keys().copied().collect::<Vec<_>>()
        );
    }

    fn run(ops: &[Op], offset: u64) {
        let mut m = SeqMap::new();
        let mut t = BTreeMap::new();
        for (n, o) in ops.iter().enumerate() {
            match *o {
                Op::Insert(k, v) => assert_eq!(m.insert(k + offset, v), t.insert(k + offset, v)),
                Op::Remove(k) => assert_eq!(m.remove(k + offset), t.remove(&(k + offset))),
                Op::PopFirst => assert_eq!(m.pop_first(), t.pop_first()),
                Op::Bump(k) => {
                    let a = m.get_mut(k + offset).map(|v| {
                        *v = v.wrapping_add(1);
                        *v
                    });
                    let b = t.get_mut(&(k + offset)).map(|v| {
                        *v = v.wrapping_add(1);
                        *v
                    });
                    assert_eq!(a, b);
                }
                Op::BumpAll => {
                    m.iter_mut()
                        .for_each(|(k, v)| *v = v.wrapping_add(k as u32));
                    t.iter_mut()
                        .for_each(|(k, v)| *v = v.wrapping_add(*k as u32));
                }
            }
            check(&m, &t, offset + n as u64 * 3);
        }
    }

    proptest! {
        /// Dense keys stay in the ring; it behaves as a `BTreeMap`.
        #[test]
        fn ring_matches_btreemap(ops in prop::collection::vec(op(64), 0..200), offset in 0u64..1_000_000) {
            run(&ops, offset);
        }

        /// Keys far apart move the map into the tree and back when it empties.
        #[test]
        fn spread_keys_match_btreemap(ops in prop::collection::vec(op(4 * SPAN_LIMIT), 0..200)) {
            run(&ops, 0);
        }
    }

    #[test]
    fn far_keys_become_a_tree_and_an_empty_tree_a_ring() {
        let mut m = SeqMap::new();
        m.insert(5, ());
        m.insert(5 + SPAN_LIMIT, ());
        assert!(matches!(m.inner, Inner::Tree(_)));
        assert_eq!(m.first_key(), Some(5));
        assert_eq!(m.pop_first(), Some((5, ())));
        assert_eq!(m.remove(5 + SPAN_LIMIT), Some(()));
        assert!(matches!(m.inner, Inner::Ring { .. }));
        assert_eq!(m.len(), 0);
        m.insert(u64::MAX, ());
        m.insert(u64::MAX - 1, ());
        assert_eq!(m.last_key(), Some(u64::MAX));
        assert_eq!(m.range(0, u64::MAX).count(), 2);
    }

    #[test]
    fn ring_span_stays_bounded() {
        let mut m = SeqMap::new();
        for s in 0..3 * SPAN_LIMIT {
            m.insert(s, ());
            if m.len() > 100 {
                m.pop_first();
            }
        }
        let Inner::Ring { slots, .. } = &m.inner else {
            panic!("a sliding window stays a ring");
        };
        assert_eq!(slots.len(), 100);
    }
}
