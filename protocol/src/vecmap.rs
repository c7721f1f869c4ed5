//! [`VecMap`]: a small ordered map in two sorted vectors.
//!
//! A peer has a few dozen links (at most `MAX_LINKS`) and looks one up on
//! every frame it handles and every buffer level its driver reports. A
//! `BTreeMap` of them spreads keys and values over nodes of several kilobytes;
//! here the keys sit packed in one vector, so a binary search reads a few
//! cache lines, and the value found is one more. Links come and go rarely, so
//! the shifting an insert or a removal costs does not matter. Iteration is in
//! key order, as a `BTreeMap`'s.

use std::iter::Zip;
use std::slice;

/// An ordered map from `K` to `V` in two sorted vectors.
#[derive(Debug, Clone)]
pub struct VecMap<K, V> {
    keys: Vec<K>,
    vals: Vec<V>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap {
            keys: Vec::new(),
            vals: Vec::new(),
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
        self.keys.binary_search(k)
    }

    /// The value of `k`.
    #[must_use]
    pub fn get(&self, k: &K) -> Option<&V> {
        self.find(k).ok().map(|i| &self.vals[i])
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

    /// Sets the value of `k`, returning the old one.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.vals[i], v)),
            Err(i) => {
                self.keys.insert(i, k);
                self.vals.insert(i, v);
                None
            }
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v), r.insert(k, v)),
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
}
