//! [`VecMap`] and [`VecSet`]: a small ordered map and set in sorted vectors.
//!
//! A peer has a few dozen links (at most `MAX_LINKS`) and looks one up on
//! every frame it handles and every buffer level its driver reports. A
//! `BTreeMap` of them spreads keys and values over nodes of several kilobytes;
//! here the keys sit packed in one vector, so a binary search reads a few
//! cache lines, and the value found is one more. Links come and go rarely, so
//! the shifting an insert or a removal costs does not matter. Iteration is in
//! key order, as a `BTreeMap`'s.
//!
//! The same goes for a peer's send queue ([`VecSet`]): a few entries most of
//! the time (at most `MAX_QUEUED_PUSHES`), read from the front on every pump.

use std::cell::Cell;
use std::iter::Zip;
use std::ops::{Bound, RangeBounds};
use std::slice;

use crate::prefetch;

/// An ordered map from `K` to `V` in two sorted vectors.
#[derive(Debug, Clone)]
pub struct VecMap<K, V> {
    keys: Vec<K>,
    vals: Vec<V>,
    /// Where the last key found sat: a peer looks the same link up several
    /// times while it handles one frame, and a hit here skips the search.
    /// Checked against the key, so a stale one only misses.
    last: Cell<usize>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap {
            keys: Vec::new(),
            vals: Vec::new(),
            last: Cell::new(0),
        }
    }
}

impl<K: Ord + Copy, V> VecMap<K, V> {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, k: &K) -> Result<usize, usize> {
        let last = self.last.get();
        if self.keys.get(last) == Some(k) {
            return Ok(last);
        }
        let found = self.keys.binary_search(k);
        if let Ok(i) = found {
            self.last.set(i);
        }
        found
    }

    /// The value of `k`.
    #[must_use]
    pub fn get(&self, k: &K) -> Option<&V> {
        self.find(k).ok().map(|i| &self.vals[i])
    }

    /// Prefetches its key list (see [`crate::prefetch`]): the first line and
    /// the middle, where every binary search starts.
    pub fn prefetch_keys(&self) {
        prefetch::at(&self.keys, 0);
        prefetch::at(&self.keys, self.keys.len() / 2);
    }

    /// The value of `k`, or else the first value (see `Peer::prefetch`).
    #[must_use]
    pub fn get_or_first(&self, k: Option<K>) -> Option<&V> {
        let at = k.and_then(|k| self.find(&k).ok()).unwrap_or(0);
        self.vals.get(at)
    }

    /// The value of `k`, mutable.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.find(k).ok().map(|i| &mut self.vals[i])
    }

    /// Whether `k` has a value.
    #[must_use]
    pub fn contains_key(&self, k: &K) -> bool {
        self.find(k).is_ok()
    }

    /// The value of `k`, inserted as `V::default()` if there was none.
    pub fn get_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                self.keys.insert(i, k);
                self.vals.insert(i, V::default());
                i
            }
        };
        &mut self.vals[i]
    }

    /// Removes `k`, returning its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.find(k).ok()?;
        self.keys.remove(i);
        Some(self.vals.remove(i))
    }

    /// Entries in key order.
    pub fn iter(&self) -> Zip<slice::Iter<'_, K>, slice::Iter<'_, V>> {
        self.keys.iter().zip(self.vals.iter())
    }

    /// Entries in key order, values mutable.
    pub fn iter_mut(&mut self) -> Zip<slice::Iter<'_, K>, slice::IterMut<'_, V>> {
        self.keys.iter().zip(self.vals.iter_mut())
    }

    /// Keys in order.
    pub fn keys(&self) -> slice::Iter<'_, K> {
        self.keys.iter()
    }

    /// Values in key order.
    pub fn values(&self) -> slice::Iter<'_, V> {
        self.vals.iter()
    }
}

impl<'a, K: Ord + Copy, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Zip<slice::Iter<'a, K>, slice::Iter<'a, V>>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// An ordered set of `T` in one sorted vector.
#[derive(Debug, Clone)]
pub struct VecSet<T> {
    items: Vec<T>,
}

impl<T> Default for VecSet<T> {
    fn default() -> Self {
        VecSet { items: Vec::new() }
    }
}

impl<T: Ord + Copy> VecSet<T> {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether it holds `x`.
    #[must_use]
    pub fn contains(&self, x: &T) -> bool {
        self.items.binary_search(x).is_ok()
    }

    /// Adds `x`; false if it was there.
    pub fn insert(&mut self, x: T) -> bool {
        // Nearly half the entries a peer adds are the greatest yet (the
        // latest due time, the newest block's pushes): they append without
        // a search.
        if self.items.last().is_none_or(|l| *l < x) {
            self.items.push(x);
            return true;
        }
        match self.items.binary_search(&x) {
            Ok(_) => false,
            Err(i) => {
                self.items.insert(i, x);
                true
            }
        }
    }

    /// Removes `x`; false if it was not there.
    pub fn remove(&mut self, x: &T) -> bool {
        // Most removals take the least entry (the earliest due time, the
        // oldest push): it is found in the first line, whereas a search waits
        // on a line for each of its steps.
        if self.items.first() == Some(x) {
            self.items.remove(0);
            return true;
        }
        match self.items.binary_search(x) {
            Ok(i) => {
                self.items.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// The least entry.
    #[must_use]
    pub fn first(&self) -> Option<&T> {
        self.items.first()
    }

    /// Removes and returns the greatest entry.
    pub fn pop_last(&mut self) -> Option<T> {
        self.items.pop()
    }

    /// The entries within `r`, in order (none if it is empty or reversed).
    pub fn range<R: RangeBounds<T>>(&self, r: R) -> slice::Iter<'_, T> {
        let lo = match r.start_bound() {
            Bound::Included(x) => self.items.partition_point(|e| e < x),
            Bound::Excluded(x) => self.items.partition_point(|e| e <= x),
            Bound::Unbounded => 0,
        };
        let hi = match r.end_bound() {
            Bound::Included(x) => self.items.partition_point(|e| e <= x),
            Bound::Excluded(x) => self.items.partition_point(|e| e < x),
            Bound::Unbounded => self.items.len(),
        };
        self.items[lo..hi.max(lo)].iter()
    }

    /// Keeps the entries for which `f` holds.
    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        self.items.retain(f);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::ops::Bound::{Excluded, Included, Unbounded};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Default(u8),
        Remove(u8),
        Bump(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            any::<u8>().prop_map(Op::Default),
            any::<u8>().prop_map(Op::Remove),
            any::<u8>().prop_map(Op::Bump),
        ]
    }

    proptest! {
        /// Every operation answers as a `BTreeMap`'s would, and iteration
        /// visits the same entries in the same order.
        #[test]
        fn it_behaves_as_a_btreemap(ops in prop::collection::vec(op(), 0..300)) {
            let mut m = VecMap::new();
            let mut r = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => {
                        let had = m.get(&k).copied();
                        *m.get_or_default(k) = v;
                        prop_assert_eq!(had, r.insert(k, v));
                    }
                    Op::Default(k) => {
                        *m.get_or_default(k) += 1;
                        *r.entry(k).or_default() += 1;
                    }
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), r.remove(&k)),
                    Op::Bump(k) => {
                        if let Some(v) = m.get_mut(&k) {
                            *v = v.wrapping_mul(3);
                        }
                        if let Some(v) = r.get_mut(&k) {
                            *v = v.wrapping_mul(3);
                        }
                    }
                }
                prop_assert_eq!(m.len(), r.len());
                prop_assert_eq!(m.is_empty(), r.is_empty());
                for k in [0u8, 7, 100, 255] {
                    prop_assert_eq!(m.get(&k), r.get(&k));
                    prop_assert_eq!(m.contains_key(&k), r.contains_key(&k));
                }
            }
            prop_assert!(m.iter().eq(r.iter()));
            prop_assert!(m.keys().eq(r.keys()));
            prop_assert!(m.values().eq(r.values()));
            for (_, v) in m.iter_mut() {
                *v = v.wrapping_add(1);
            }
            prop_assert!((&m).into_iter().map(|(k, v)| (*k, *v)).eq(r.iter().map(|(k, v)| (*k, v.wrapping_add(1)))));
        }
    }

    #[derive(Debug, Clone)]
    enum SetOp {
        Insert(u8, u8),
        Remove(u8, u8),
        PopLast,
        Retain(u8),
    }

    fn set_op() -> impl Strategy<Value = SetOp> {
        prop_oneof![
            3 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SetOp::Insert(a % 4, b)),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SetOp::Remove(a % 4, b)),
            1 => Just(SetOp::PopLast),
            1 => any::<u8>().prop_map(SetOp::Retain),
        ]
    }

    fn bound(kind: u8, x: (u8, u8)) -> Bound<(u8, u8)> {
        match kind % 3 {
            0 => Included(x),
            1 => Excluded(x),
            _ => Unbounded,
        }
    }

    proptest! {
        /// Every operation and every range answers as a `BTreeSet`'s would.
        #[test]
        fn a_set_behaves_as_a_btreeset(
            ops in prop::collection::vec(set_op(), 0..300),
            ranges in prop::collection::vec((any::<u8>(), any::<(u8, u8)>(), any::<u8>(), any::<(u8, u8)>()), 1..20),
        ) {
            let mut m = VecSet::new();
            let mut r = BTreeSet::new();
            for o in ops {
                match o {
                    SetOp::Insert(a, b) => prop_assert_eq!(m.insert((a, b)), r.insert((a, b))),
                    SetOp::Remove(a, b) => prop_assert_eq!(m.remove(&(a, b)), r.remove(&(a, b))),
                    SetOp::PopLast => prop_assert_eq!(m.pop_last(), r.pop_last()),
                    SetOp::Retain(k) => {
                        m.retain(|e| e.1 % 7 != k % 7);
                        r.retain(|e| e.1 % 7 != k % 7);
                    }
                }
                prop_assert_eq!(m.len(), r.len());
                prop_assert_eq!(m.is_empty(), r.is_empty());
                prop_assert_eq!(m.first(), r.first());
                prop_assert_eq!(m.contains(&(1, 1)), r.contains(&(1, 1)));
            }
            prop_assert!(m.range(..).eq(r.iter()));
            for (ka, a, kb, b) in ranges {
                let (lo, hi) = (bound(ka, a), bound(kb, b));
                // A BTreeSet panics on a reversed or empty excluded range.
                let valid = match (lo, hi) {
                    (Included(x) | Excluded(x), Included(y) | Excluded(y)) => {
                        x < y || (x == y && !(matches!(lo, Excluded(_)) && matches!(hi, Excluded(_))))
                    }
                    _ => true,
                };
                if valid {
                    prop_assert!(m.range((lo, hi)).eq(r.range((lo, hi))));
                } else {
                    prop_assert_eq!(m.range((lo, hi)).count(), 0);
                }
            }
        }
    }
}
