//! What [`export_actor!`](crate::export_actor) expands to: the actor's single instance and
//! the exports Tern calls.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;

use crate::Actor;

/// Holds the one actor instance of a guest. Wasm guests are single-threaded.
pub struct ActorCell<A>(RefCell<Option<A>>);

// SAFETY: a `tern` guest runs on one thread (no shared memory, no threads), so the cell is
// never reached from two threads at once.
unsafe impl<A> Sync for ActorCell<A> {}

impl<A: Actor> ActorCell<A> {
    pub const fn new() -> Self {
        ActorCell(RefCell::new(None))
    }

    fn with<R>(&self, f: impl FnOnce(&mut A) -> R) -> R {
        let mut slot = self.0.borrow_mut();
        f(slot.get_or_insert_with(A::default))
    }
}

impl<A: Actor> Default for ActorCell<A> {
    fn default() -> Self {
        Self::new()
    }
}

const MESSAGE_ALIGN: usize = 8;

#[doc(hidden)]
pub fn __alloc(len: u32) -> *mut u8 {
    let Ok(layout) = Layout::from_size_align(len.max(1) as usize, MESSAGE_ALIGN) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the layout has a non-zero size.
    unsafe { alloc_zeroed(layout) }
}

#[doc(hidden)]
pub fn __init<A: Actor>(cell: &ActorCell<A>) {
    cell.with(|a| a.init());
}

/// Hands the message at `ptr` to the actor, then frees it.
///
/// # Safety
///
/// `ptr` is null or came from `__alloc(len)`, has `len` initialized bytes, and is not used
/// again by the caller.
#[doc(hidden)]
pub unsafe fn __on_message<A: Actor>(cell: &ActorCell<A>, ptr: *mut u8, len: u32) -> i32 {
    if ptr.is_null() {
        return -100;
    }
    // SAFETY: `ptr` came from `__alloc(len)` and the host wrote exactly `len` bytes to it.
    let message = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
    let result = cell.with(|a| a.on_message(message));
    // SAFETY: same pointer and layout as the allocation in `__alloc`.
    unsafe {
        dealloc(
            ptr,
            Layout::from_size_align_unchecked(len.max(1) as usize, MESSAGE_ALIGN),
        )
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = crate::emit_str(&format!("error: {}\n", e.message));
            e.code.min(-1)
        }
    }
}

/// Exports `$actor` (a type implementing [`Actor`](crate::Actor) + `Default`) as this
/// module's Tern actor.
#[macro_export]
macro_rules! export_actor {
    ($actor:ty) => {
        static __TERN_ACTOR: $crate::ActorCell<$actor> = $crate::ActorCell::new();

        #[unsafe(no_mangle)]
        pub extern "C" fn tern_alloc(len: u32) -> *mut u8 {
            $crate::__alloc(len)
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn tern_init() {
            $crate::__init(&__TERN_ACTOR)
        }

        #[unsafe(no_mangle)]
        #[allow(clippy::not_unsafe_ptr_arg_deref)] // called only by the host, as documented
        pub extern "C" fn tern_on_message(ptr: *mut u8, len: u32) -> i32 {
            // SAFETY: the host passes the pointer `tern_alloc(len)` returned, with the
            // message's `len` bytes written into it, and never reuses it.
            unsafe { $crate::__on_message(&__TERN_ACTOR, ptr, len) }
        }
    };
}
