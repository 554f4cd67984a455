//! The result of a pick: [`Pick`], which borrows its picker, and [`OwnedPick`], which holds it
//! (by `Arc` or any handle that dereferences to it). Both end the in-flight call they count
//! when dropped.

use std::ops::Deref;
use std::sync::Arc;

use super::{Backend, Picker};

/// The result of a pick: the backend, plus — when the picker counts in-flight calls — the
/// accounting of one call in flight, ended when this is dropped.
#[derive(Debug)]
pub struct Pick<'a> {
    pub(super) picker: &'a Picker,
    pub(super) index: u32,
    pub(super) counted: bool,
}

impl<'a> Pick<'a> {
    /// The picked backend.
    pub fn backend(&self) -> &'a Backend {
        &self.picker.backends[self.index as usize]
    }
    /// Whether this pick counts as an in-flight call until dropped.
    pub fn is_counted(&self) -> bool {
        self.counted
    }
    /// The picked backend's position in [`Picker::backends`].
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

impl Pick<'_> {
    /// Converts into an owned pick. `picker` must be the `Arc` this pick was made from.
    ///
    /// # Panics
    /// Panics if `picker` is not the picker this pick came from (a programming error).
    #[inline]
    pub fn into_owned(self, picker: &Arc<Picker>) -> OwnedPick {
        self.into_owned_by(picker.clone())
    }

    /// Converts into an owned pick that holds `owner` — any handle that dereferences to the
    /// picker this pick came from, such as a per-thread view of it — to end the call later.
    ///
    /// # Panics
    /// Panics if `owner` does not dereference to the picker this pick came from (a programming
    /// error).
    #[inline]
    pub fn into_owned_by<P: Deref<Target = Picker>>(self, owner: P) -> OwnedPick<P> {
        assert!(
            std::ptr::eq(self.picker, &*owner),
            "into_owned called with a different picker"
        );
        let owned = OwnedPick {
            picker: owner,
            index: self.index,
            counted: self.counted,
        };
        std::mem::forget(self);
        owned
    }
}

/// A [`Pick`] that owns its picker through `P` (by default the picker's `Arc`): `'static`, and
/// `Send` and `Sync` when `P` is. Dropping it ends the in-flight call it counts.
#[derive(Debug)]
pub struct OwnedPick<P: Deref<Target = Picker> = Arc<Picker>> {
    picker: P,
    index: u32,
    counted: bool,
}

impl<P: Deref<Target = Picker>> OwnedPick<P> {
    /// The picked backend.
    pub fn backend(&self) -> &Backend {
        &self.picker.backends[self.index as usize]
    }
    /// Whether this pick counts as an in-flight call until dropped.
    pub fn is_counted(&self) -> bool {
        self.counted
    }
    /// The picked backend's position in [`Picker::backends`].
    pub fn index(&self) -> usize {
        self.index as usize
    }
}

impl<P: Deref<Target = Picker>> Drop for OwnedPick<P> {
    #[inline]
    fn drop(&mut self) {
        if self.counted {
            self.picker.release(self.index);
        }
    }
}

impl Drop for Pick<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.counted {
            self.picker.release(self.index);
        }
    }
}
