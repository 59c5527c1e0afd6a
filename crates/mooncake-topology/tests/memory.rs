use mooncake_topology::memory_location;

const LEN: usize = 1 << 16;

/// An anonymous private mapping of `LEN` bytes.
fn map() -> *mut u8 {
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address touches no existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap");
    ptr.cast()
}

fn unmap(ptr: *mut u8) {
    // SAFETY: `ptr` came from `map` with the same length and is not used afterwards.
    assert_eq!(unsafe { libc::munmap(ptr.cast(), LEN) }, 0);
}

#[test]
fn touched_page_bound_to_node_0_reports_cpu_0() {
    let ptr = map();
    let mask: libc::c_ulong = 1;
    // SAFETY: mbind only changes the policy of our own fresh mapping; `mask` outlives the call.
    // A refusal (no NUMA support) leaves first-touch placement, which on node 0 is the same.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            LEN as libc::c_ulong,
            2 as libc::c_int, // MPOL_BIND
            &mask as *const libc::c_ulong,
            libc::c_ulong::BITS as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    // SAFETY: the mapping is writable and LEN bytes long.
    unsafe { std::ptr::write_bytes(ptr, 0xab, LEN) };
    assert_eq!(memory_location(ptr as usize, LEN), "cpu:0");
    // An address inside the first page still names that page.
    assert_eq!(memory_location(ptr as usize + 100, 8), "cpu:0");
    unmap(ptr);
}

#[test]
fn untouched_unmapped_or_empty_ranges_are_wildcard() {
    let ptr = map();
    assert_eq!(
        memory_location(ptr as usize, LEN),
        "*",
        "not faulted in yet"
    );
    unmap(ptr);
    assert_eq!(memory_location(ptr as usize, LEN), "*", "unmapped");
    assert_eq!(memory_location(0, LEN), "*");
    let value = 7u64;
    assert_eq!(memory_location(&value as *const u64 as usize, 0), "*");
}
