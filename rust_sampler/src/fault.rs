//! Reads of a mapped file that survive its truncation.
//!
//! Reading a page of a memory map that lies past the file's new end (another process truncated
//! it) raises SIGBUS, which kills the process: no Python handler runs, and the user sees "bus
//! error" and nothing about which file. A check of the file's size before each batch (Python's
//! `SizeGuardedSampler`) narrows that to a race, but a truncation during the copy still lands.
//!
//! So every token file's map is registered here, and a SIGBUS handler looks the faulting address
//! up: inside a registered map, it maps a zero page over the faulting page (the read then
//! completes, with zeros) and marks the map as truncated; the sampler checks the mark after each
//! batch, discards the batch and reports the file. A fault anywhere else goes on to the handler
//! that was there before (or the default action: the process ends with SIGBUS as it would have).
//!
//! The handler calls only `mmap` and `sigaction`, both plain system calls on Linux, and reads
//! only atomics: nothing that takes a lock or allocates.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Maps registered at once; past this, a map is not covered (the size check still is).
const SLOTS: usize = 4096;

struct Slot {
    /// 0: free; 1: being filled; else one past the map's last byte.
    end: AtomicUsize,
    start: AtomicUsize,
    truncated: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    end: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    truncated: AtomicBool::new(false),
};
static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// One past the highest slot ever used: the handler scans no further.
static USED: AtomicUsize = AtomicUsize::new(0);

/// A registered map: marks it truncated when a read of it faults; unregisters on drop.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Registers the `len` bytes at `start` (a map), installing the handler the first time.
    pub fn register(start: *const u8, len: usize) -> Guard {
        if len == 0 || !handler::install() {
            return Guard { slot: None };
        }
        for (i, slot) in SLOTS_TABLE.iter().enumerate() {
            if slot
                .end
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                USED.fetch_max(i + 1, Ordering::AcqRel);
                slot.truncated.store(false, Ordering::Release);
                slot.start.store(start as usize, Ordering::Release);
                slot.end
                    .store((start as usize).saturating_add(len), Ordering::Release);
                return Guard { slot: Some(i) };
            }
        }
        Guard { slot: None }
    }

    /// Whether a read of the map has faulted (its file shrank under it). Sticky: the faulting
    /// pages now read as zeros.
    pub fn truncated(&self) -> bool {
        self.slot
            .is_some_and(|i| SLOTS_TABLE[i].truncated.load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Freed before the map goes (the owner unmaps after), so an address the kernel hands out
        // again is never taken for this map.
        if let Some(i) = self.slot {
            SLOTS_TABLE[i].end.store(0, Ordering::Release);
        }
    }
}

/// The registered map holding `addr`, if any.
fn slot_of(addr: usize) -> Option<&'static Slot> {
    let used = USED.load(Ordering::Acquire).min(SLOTS);
    SLOTS_TABLE[..used].iter().find(|s| {
        let end = s.end.load(Ordering::Acquire);
        end > 1 && s.start.load(Ordering::Acquire) <= addr && addr < end
    })
}

#[cfg(unix)]
mod handler {
    use super::slot_of;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    /// The action SIGBUS had before ours, set once before ours is installed.
    static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

    /// Installs the handler once; false if the system refused it.
    pub fn install() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::Release);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            // SAFETY: PREVIOUS is written here once, before the handler that reads it exists.
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            libc::sigaction(libc::SIGBUS, &action, previous) == 0
        })
    }

    extern "C" fn on_sigbus(
        sig: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        if let Some(slot) = slot_of(addr) {
            let page = PAGE.load(Ordering::Acquire);
            let base = addr & !(page - 1);
            // A private zero page over the one past the file's end: the faulting read is retried
            // on return and reads zeros, which the batch check then discards.
            let zero = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zero != libc::MAP_FAILED {
                slot.truncated.store(true, Ordering::Release);
                return;
            }
        }
        // Not ours: what would have happened without this handler.
        // SAFETY: PREVIOUS was set before this handler was installed and is never written again.
        let previous = unsafe {
            std::ptr::addr_of!(PREVIOUS)
                .cast::<libc::sigaction>()
                .read()
        };
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // Back to the default; returning retries the read, which faults again and ends the
            // process with SIGBUS.
            unsafe { libc::sigaction(libc::SIGBUS, &previous, std::ptr::null_mut()) };
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, context);
        } else {
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }
}

#[cfg(not(unix))]
mod handler {
    pub fn install() -> bool {
        false
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use memmap2::Mmap;
    use std::io::Write;

    #[test]
    fn a_read_past_a_truncated_end_is_marked_not_a_bus_error() {
        let dir = std::env::temp_dir().join(format!("fault-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        let map = unsafe { Mmap::map(&file) }.unwrap();
        let guard = Guard::register(map.as_ptr(), map.len());
        assert_eq!(map[100_000], 7);
        assert!(!guard.truncated());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Volatile reads: the compiler may not assume the map is unchanged.
        let read = |i: usize| unsafe { std::ptr::read_volatile(map.as_ptr().add(i)) };
        assert_eq!(read(10), 7); // still inside the file
        assert!(!guard.truncated());
        assert_eq!(read(500_000), 0); // past the end: the zero page, not SIGBUS
        assert!(guard.truncated());
        drop(guard);
        drop(map);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
