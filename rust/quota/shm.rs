//! The shared mapping and its layout: a header, the account slots, the reservation slots.
//!
//! Every field of every region is an `AtomicU64` at an offset that is a multiple of 64, so the
//! same bytes can be used from any number of threads and processes; nothing in the mapping is a
//! pointer. Offsets are fixed by the capacities recorded in the header.

use super::error::{QuotaError, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// "TKHQUOTA", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TKHQUOTA");
/// Bumped whenever the layout or the meaning of a field changes.
pub const VERSION: u64 = 1;
/// Longest account name, in bytes.
pub const NAME_MAX: usize = 96;
const NAME_WORDS: usize = NAME_MAX / 8;
/// Most account slots (indexes fit in 32 bits with room to spare).
pub const MAX_ACCOUNTS: u32 = 1 << 24;
/// Most reservation slots: a reservation id keeps 24 bits for the slot, 40 for its generation.
pub const MAX_RESERVATIONS: u32 = 1 << 24;

/// The first 256 bytes of the file.
#[repr(C, align(64))]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU64,
    /// Sizes of the header and of the two slot kinds (16 bits each): a build whose structs
    /// differ refuses to attach rather than misread the table.
    pub layout: AtomicU64,
    pub account_capacity: AtomicU64,
    pub reservation_capacity: AtomicU64,
    pub total_size: AtomicU64,
    /// Random per table; reservation ids are XORed with it (see `ResId`).
    pub secret: AtomicU64,
    /// 1 once the creator has written everything above.
    pub ready: AtomicU64,
    /// Account slots claimed so far (informational).
    pub accounts_in_use: AtomicU64,
    _pad: [AtomicU64; 23],
}

/// A limit, and what has been taken against it: `charged` = held + used is the one word
/// admission compares with `limit`, so moving an amount from held to used never opens a window
/// in which another reservation could slip in.
#[repr(C)]
pub struct BudgetCell {
    pub limit: AtomicU64,
    pub charged: AtomicU64,
    pub used: AtomicU64,
    pub overrun: AtomicU64,
}

/// One GCRA limiter: a per-minute limit and the theoretical arrival time (ns, CLOCK_MONOTONIC).
#[repr(C)]
pub struct GcraCell {
    pub limit: AtomicU64,
    pub tat: AtomicU64,
}

/// Account slot states.
pub const ACC_EMPTY: u64 = 0;
pub const ACC_CLAIMING: u64 = 1;
pub const ACC_READY: u64 = 2;

#[repr(C, align(64))]
pub struct AccountSlot {
    pub state: AtomicU64,
    pub hash: AtomicU64,
    pub name_len: AtomicU64,
    pub name: [AtomicU64; NAME_WORDS],
    /// Reservations and extensions this account refused.
    pub refused: AtomicU64,
    /// Tokens, money (nano-units), requests: see `Budget`.
    pub budgets: [BudgetCell; 3],
    pub conc_limit: AtomicU64,
    pub conc_inflight: AtomicU64,
    pub rpm: GcraCell,
    pub tpm: GcraCell,
    /// Reservations this account admitted.
    pub admitted: AtomicU64,
    _pad: [AtomicU64; 5],
}

/// Reservation slot states (the low 8 bits of `ResSlot::state`; the generation is above them).
pub const RES_FREE: u64 = 0;
/// Owned by one call that is writing or reading the slot; nobody else touches its fields.
pub const RES_BUSY: u64 = 1;
pub const RES_HELD: u64 = 2;
pub const RES_SETTLED: u64 = 3;
pub const RES_CANCELLED: u64 = 4;
pub const RES_EXPIRED: u64 = 5;
/// Expired, then settled after all (the usage was recorded as an overrun).
pub const RES_LATE: u64 = 6;

#[repr(C, align(64))]
pub struct ResSlot {
    /// generation << 8 | state.
    pub state: AtomicU64,
    pub deadline_ms: AtomicU64,
    pub tokens: AtomicU64,
    pub money: AtomicU64,
    /// requests (32 bits) | concurrent (8 bits) << 32 | number of accounts (8 bits) << 40.
    pub misc: AtomicU64,
    /// Up to four account indexes, two per word.
    pub accounts: [AtomicU64; 2],
    /// How the reservations that used this slot ended. Written only by the call that owns the
    /// slot (state BUSY), so a load and a store suffice.
    pub settled: AtomicU64,
    pub cancelled: AtomicU64,
    pub expired: AtomicU64,
    pub late: AtomicU64,
    _pad: [AtomicU64; 5],
}

pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();
pub const ACCOUNT_SIZE: usize = std::mem::size_of::<AccountSlot>();
pub const RES_SIZE: usize = std::mem::size_of::<ResSlot>();
const _: () = assert!(HEADER_SIZE == 256);
const _: () = assert!(ACCOUNT_SIZE == 320);
const _: () = assert!(RES_SIZE == 128);

fn layout_word() -> u64 {
    HEADER_SIZE as u64 | (ACCOUNT_SIZE as u64) << 16 | (RES_SIZE as u64) << 32
}

/// Bytes a table with these capacities occupies.
pub fn table_size(accounts: u32, reservations: u32) -> usize {
    HEADER_SIZE + accounts as usize * ACCOUNT_SIZE + reservations as usize * RES_SIZE
}

/// A `MAP_SHARED` mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through atomics (see the module docs).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl Mapping {
    fn map(fd: Option<&File>, len: usize) -> std::io::Result<Mapping> {
        let (flags, raw) = match fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(ptr.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| std::io::Error::other("mmap returned null"))
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least HEADER_SIZE long (checked by every
        // constructor); Header is only atomics, valid for any bit pattern.
        unsafe { &*self.ptr.as_ptr().cast::<Header>() }
    }

    /// The account and reservation slot arrays.
    ///
    /// # Safety
    /// The mapping must be `table_size(accounts, reservations)` bytes long.
    pub unsafe fn regions(&self, accounts: u32, reservations: u32) -> (&[AccountSlot], &[ResSlot]) {
        debug_assert!(self.len >= table_size(accounts, reservations));
        let base = self.ptr.as_ptr();
        let acc = base.add(HEADER_SIZE).cast::<AccountSlot>();
        let res = base
            .add(HEADER_SIZE + accounts as usize * ACCOUNT_SIZE)
            .cast::<ResSlot>();
        (
            std::slice::from_raw_parts(acc, accounts as usize),
            std::slice::from_raw_parts(res, reservations as usize),
        )
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> QuotaError {
    QuotaError::Io {
        path: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

fn random_secret() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let fallback = || {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: t is a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
        (t.tv_sec as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ t.tv_nsec as u64
            ^ std::process::id() as u64
    };
    if n == 8 {
        u64::from_le_bytes(buf)
    } else {
        fallback()
    }
}

fn check_capacities(accounts: u32, reservations: u32) -> Result<()> {
    if accounts == 0 || accounts > MAX_ACCOUNTS {
        return Err(QuotaError::Invalid(format!(
            "account capacity must be 1..={MAX_ACCOUNTS}, not {accounts}"
        )));
    }
    if reservations == 0 || reservations > MAX_RESERVATIONS {
        return Err(QuotaError::Invalid(format!(
            "reservation capacity must be 1..={MAX_RESERVATIONS}, not {reservations}"
        )));
    }
    Ok(())
}

fn write_header(map: &Mapping, accounts: u32, reservations: u32) {
    let h = map.header();
    h.magic.store(MAGIC, Ordering::Relaxed);
    h.version.store(VERSION, Ordering::Relaxed);
    h.layout.store(layout_word(), Ordering::Relaxed);
    h.account_capacity.store(accounts as u64, Ordering::Relaxed);
    h.reservation_capacity
        .store(reservations as u64, Ordering::Relaxed);
    h.total_size
        .store(table_size(accounts, reservations) as u64, Ordering::Relaxed);
    h.secret.store(random_secret(), Ordering::Relaxed);
    h.ready.store(1, Ordering::Release);
}

/// Creates a fresh zeroed table at `path`: written to a temporary file beside it and renamed
/// into place, so a process attaching concurrently sees either the old table or the whole new
/// one, and processes still mapping the old one keep it (they never see a truncated file).
pub fn create(path: &Path, accounts: u32, reservations: u32) -> Result<Mapping> {
    check_capacities(accounts, reservations)?;
    let len = table_size(accounts, reservations);
    let name = path
        .file_name()
        .ok_or_else(|| QuotaError::Invalid(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, "cannot create", e))?;
    let result = (|| {
        file.set_len(len as u64)
            .map_err(|e| io_err(&tmp, "cannot size", e))?;
        let map = Mapping::map(Some(&file), len).map_err(|e| io_err(&tmp, "cannot map", e))?;
        write_header(&map, accounts, reservations);
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot rename into place", e))?;
        Ok(map)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A table in anonymous shared memory: shared with threads, and with children forked after it.
pub fn anonymous(accounts: u32, reservations: u32) -> Result<Mapping> {
    check_capacities(accounts, reservations)?;
    let len = table_size(accounts, reservations);
    let map =
        Mapping::map(None, len).map_err(|e| io_err(Path::new("<anonymous>"), "cannot map", e))?;
    write_header(&map, accounts, reservations);
    Ok(map)
}

/// Maps an existing table and checks that its header describes what this build expects.
/// Returns the mapping and the capacities.
pub fn attach(path: &Path) -> Result<(Mapping, u32, u32)> {
    let bad = |message: String| QuotaError::BadTable {
        path: path.display().to_string(),
        message,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, "cannot open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_err(path, "cannot stat", e))?
        .len();
    if file_len < HEADER_SIZE as u64 {
        return Err(bad(format!(
            "{file_len} bytes is shorter than the {HEADER_SIZE}-byte header"
        )));
    }
    let head = Mapping::map(Some(&file), HEADER_SIZE).map_err(|e| io_err(path, "cannot map", e))?;
    let h = head.header();
    let magic = h.magic.load(Ordering::Relaxed);
    if magic != MAGIC {
        return Err(bad(format!("bad magic {magic:#018x}")));
    }
    if h.ready.load(Ordering::Acquire) != 1 {
        return Err(bad("its creator never finished writing the header".into()));
    }
    let version = h.version.load(Ordering::Relaxed);
    if version != VERSION {
        return Err(bad(format!(
            "layout version {version}, this build reads version {VERSION}"
        )));
    }
    let layout = h.layout.load(Ordering::Relaxed);
    if layout != layout_word() {
        return Err(bad(format!(
            "slot sizes {layout:#x}, this build uses {:#x}",
            layout_word()
        )));
    }
    let accounts = h.account_capacity.load(Ordering::Relaxed);
    let reservations = h.reservation_capacity.load(Ordering::Relaxed);
    let (Ok(accounts), Ok(reservations)) = (u32::try_from(accounts), u32::try_from(reservations))
    else {
        return Err(bad(format!(
            "capacities {accounts}/{reservations} out of range"
        )));
    };
    check_capacities(accounts, reservations).map_err(|e| bad(e.to_string()))?;
    let want = table_size(accounts, reservations) as u64;
    let total = h.total_size.load(Ordering::Relaxed);
    if total != want || file_len != want {
        return Err(bad(format!(
            "file is {file_len} bytes and its header says {total}; \
             {accounts} accounts and {reservations} reservations need {want}"
        )));
    }
    drop(head);
    let map =
        Mapping::map(Some(&file), want as usize).map_err(|e| io_err(path, "cannot map", e))?;
    Ok((map, accounts, reservations))
}

/// Reads the name stored in an account slot (which must be READY).
pub fn read_name(slot: &AccountSlot) -> String {
    let len = (slot.name_len.load(Ordering::Relaxed) as usize).min(NAME_MAX);
    let mut bytes = [0u8; NAME_MAX];
    for (i, w) in slot.name.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// A name packed into the words it is stored as (zero-padded).
pub fn name_words(name: &[u8]) -> [u64; NAME_WORDS] {
    let mut bytes = [0u8; NAME_MAX];
    bytes[..name.len()].copy_from_slice(name);
    let mut out = [0u64; NAME_WORDS];
    for (i, w) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(b);
    }
    out
}
