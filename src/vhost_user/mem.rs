//! Guest memory as announced by the front-end: the region table.
//!
//! Each region comes with a file descriptor (memfd, hugetlbfs or shm file), an offset into
//! it, the guest physical address (GPA) where the guest sees it, and the front-end's own
//! virtual address for it ("user address"). We map each region `MAP_SHARED` and build a
//! [`GuestMemoryMmap`] indexed by GPA, which is what descriptors contain. Ring addresses in
//! SET_VRING_ADDR are user addresses instead, so [`MemTable::user_to_gpa`] translates them.
//!
//! A region that extends beyond the end of its file would map fine and then fault (SIGBUS)
//! on first access, so regular files are checked against their size first.
//!
//! The table changes only on control messages (SET_MEM_TABLE replaces it, ADD_MEM_REG and
//! REM_MEM_REG edit it), never during a data-path call. Mappings are reference-counted
//! (`Arc`), so a rebuilt [`GuestMemoryMmap`] shares them and a removed region is unmapped
//! when the last ring holding the old table lets go of it.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most regions we accept (answer to GET_MAX_MEM_SLOTS).
pub const MAX_REGIONS: usize = 32;

/// Why a memory update was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("invalid region: zero size or address overflow")]
    Invalid,
    #[error("region ends beyond its file ({file_len} bytes)")]
    BeyondFile { file_len: u64 },
    #[error("reading region file metadata")]
    Stat(#[source] std::io::Error),
    #[error("mapping region")]
    Mmap(#[source] MmapRegionError),
    #[error("regions overlap")]
    Overlap,
    #[error("more than {MAX_REGIONS} regions")]
    TooMany,
    #[error("no such region")]
    NotFound,
    #[error("{0} regions but {1} file descriptors")]
    FdCount(usize, usize),
}

#[derive(Debug)]
struct Region {
    gpa: u64,
    size: u64,
    user: u64,
    map: Arc<GuestRegionMmap>,
}

/// The current region table and the guest memory view built from it.
#[derive(Debug, Default)]
pub struct MemTable {
    regions: Vec<Region>,
    mem: Option<GuestMemoryMmap>,
}

impl MemTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest memory by GPA, if any region is mapped.
    pub fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Forgets every region.
    pub fn clear(&mut self) {
        self.regions.clear();
        self.mem = None;
    }

    /// SET_MEM_TABLE: replaces the whole table, or changes nothing on error.
    pub fn set(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemError> {
        if regions.len() != files.len() {
            return Err(MemError::FdCount(regions.len(), files.len()));
        }
        if regions.len() > MAX_REGIONS {
            return Err(MemError::TooMany);
        }
        let mut new = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            new.push(map(r, f)?);
        }
        let mem = build(&mut new)?;
        self.regions = new;
        self.mem = mem;
        Ok(())
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, r: &VhostUserMemoryRegion, file: File) -> Result<(), MemError> {
        if self.regions.len() == MAX_REGIONS {
            return Err(MemError::TooMany);
        }
        let region = map(r, file)?;
        let mut new = self.regions.clone();
        new.push(region);
        let mem = build(&mut new)?;
        self.regions = new;
        self.mem = mem;
        Ok(())
    }

    /// REM_MEM_REG: the region is identified by GPA, user address and size.
    pub fn remove(&mut self, r: &VhostUserMemoryRegion) -> Result<(), MemError> {
        let (gpa, size, user) = (r.guest_phys_addr, r.memory_size, r.user_addr);
        let i = self
            .regions
            .iter()
            .position(|x| x.gpa == gpa && x.size == size && x.user == user)
            .ok_or(MemError::NotFound)?;
        self.regions.remove(i);
        self.mem = build(&mut self.regions)?;
        Ok(())
    }

    /// Translates a front-end virtual address to a GPA.
    pub fn user_to_gpa(&self, user: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| user >= r.user && user - r.user < r.size)
            .map(|r| r.gpa + (user - r.user))
    }
}

impl Clone for Region {
    fn clone(&self) -> Self {
        Region {
            map: Arc::clone(&self.map),
            ..*self
        }
    }
}

fn map(r: &VhostUserMemoryRegion, file: File) -> Result<Region, MemError> {
    let (gpa, size, user, offset) = (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
    if size == 0
        || gpa.checked_add(size).is_none()
        || user.checked_add(size).is_none()
        || usize::try_from(size).is_err()
    {
        return Err(MemError::Invalid);
    }
    let end = offset.checked_add(size).ok_or(MemError::Invalid)?;
    let meta = file.metadata().map_err(MemError::Stat)?;
    if meta.is_file() && end > meta.len() {
        return Err(MemError::BeyondFile {
            file_len: meta.len(),
        });
    }
    let mapping = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
        .map_err(MemError::Mmap)?;
    let map = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemError::Invalid)?;
    Ok(Region {
        gpa,
        size,
        user,
        map: Arc::new(map),
    })
}

/// Sorts `regions` by GPA and builds the memory view; rejects overlaps.
fn build(regions: &mut [Region]) -> Result<Option<GuestMemoryMmap>, MemError> {
    if regions.is_empty() {
        return Ok(None);
    }
    regions.sort_by_key(|r| r.gpa);
    GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| Arc::clone(&r.map)).collect())
        .map(Some)
        .map_err(|_| MemError::Overlap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: u64) -> File {
        let f = tempfile_memfd();
        f.set_len(len).expect("set_len");
        f
    }

    fn tempfile_memfd() -> File {
        // SAFETY: memfd_create with a valid C string; the returned fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"passt-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        use std::os::fd::FromRawFd;
        // SAFETY: fd is a fresh, valid descriptor.
        unsafe { File::from_raw_fd(fd) }
    }

    fn region(gpa: u64, size: u64, user: u64, off: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, user, off)
    }

    #[test]
    fn set_maps_and_translates() {
        let f = memfd(0x30000);
        let g = f.try_clone().expect("dup");
        let mut t = MemTable::new();
        t.set(
            &[
                region(0x100000, 0x10000, 0x7f00_0000_0000, 0),
                region(0, 0x10000, 0x7f00_1000_0000, 0x10000),
            ],
            vec![f, g],
        )
        .expect("set");
        assert_eq!(t.len(), 2);
        let mem = t.guest_memory().expect("mem");
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(t.user_to_gpa(0x7f00_0000_0010), Some(0x100010));
        assert_eq!(t.user_to_gpa(0x7f00_1000_fff0), Some(0xfff0));
        assert_eq!(t.user_to_gpa(0x7f00_1001_0000), None);
        // Both regions view the same file at different offsets.
        mem.write_obj(0xabcdu16, GuestAddress(0x100000))
            .expect("write");
        let other = t.guest_memory().expect("mem");
        assert_eq!(
            other.read_obj::<u16>(GuestAddress(0x100000)).expect("read"),
            0xabcd
        );
    }

    #[test]
    fn rejects_bad_regions_without_changing_the_table() {
        let mut t = MemTable::new();
        t.set(&[region(0, 0x1000, 0x1000, 0)], vec![memfd(0x1000)])
            .expect("set");
        assert!(matches!(
            t.set(&[region(0, 0x2000, 0x1000, 0)], vec![memfd(0x1000)]),
            Err(MemError::BeyondFile { .. })
        ));
        assert!(matches!(
            t.set(&[region(0, 0, 0x1000, 0)], vec![memfd(0x1000)]),
            Err(MemError::Invalid)
        ));
        assert!(matches!(
            t.set(&[region(u64::MAX - 10, 0x1000, 0, 0)], vec![memfd(0x1000)]),
            Err(MemError::Invalid)
        ));
        assert!(matches!(
            t.set(&[region(0, 0x1000, 0, u64::MAX)], vec![memfd(0x1000)]),
            Err(MemError::Invalid)
        ));
        assert!(matches!(
            t.set(
                &[region(0, 0x2000, 0, 0), region(0x1000, 0x1000, 0x10000, 0)],
                vec![memfd(0x2000), memfd(0x1000)]
            ),
            Err(MemError::Overlap)
        ));
        assert!(matches!(
            t.set(&[region(0, 0x1000, 0, 0)], vec![]),
            Err(MemError::FdCount(1, 0))
        ));
        assert_eq!(t.len(), 1);
        assert_eq!(t.user_to_gpa(0x1000), Some(0));
    }

    #[test]
    fn add_and_remove() {
        let mut t = MemTable::new();
        t.add(&region(0x10000, 0x1000, 0xa000, 0), memfd(0x1000))
            .expect("add");
        t.add(&region(0, 0x1000, 0xb000, 0), memfd(0x1000))
            .expect("add");
        assert!(matches!(
            t.add(&region(0x800, 0x1000, 0xc000, 0), memfd(0x1000)),
            Err(MemError::Overlap)
        ));
        assert_eq!(t.len(), 2);
        assert!(matches!(
            t.remove(&region(0, 0x1000, 0xbbbb, 0)),
            Err(MemError::NotFound)
        ));
        t.remove(&region(0, 0x1000, 0xb000, 0)).expect("remove");
        assert_eq!(t.user_to_gpa(0xb000), None);
        assert_eq!(t.user_to_gpa(0xa010), Some(0x10010));
        t.remove(&region(0x10000, 0x1000, 0xa000, 0))
            .expect("remove");
        assert!(t.guest_memory().is_none());
        for i in 0..MAX_REGIONS as u64 {
            t.add(&region(i * 0x1000, 0x1000, i * 0x1000, 0), memfd(0x1000))
                .expect("add");
        }
        assert!(matches!(
            t.add(&region(0x100_0000, 0x1000, 0x100_0000, 0), memfd(0x1000)),
            Err(MemError::TooMany)
        ));
    }
}
