//! What is attached to a cgroup (BPF_PROG_QUERY), for finding other
//! ktproxy instances (src/instances.rs).

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libbpf_rs::libbpf_sys;

/// A program attached to a cgroup, as BPF_PROG_QUERY and
/// BPF_OBJ_GET_INFO_BY_FD describe it.
pub struct AttachedProgram {
    pub name: String,
    pub map_ids: Vec<u32>,
}

/// Which attach point of a cgroup to ask about.
pub enum Hook {
    Connect4,
    Getsockopt,
}

/// The programs attached directly to the cgroup open as `dir` (not
/// inherited ones) at `hook`.
pub fn attached_programs(dir: &File, hook: Hook) -> io::Result<Vec<AttachedProgram>> {
    let ty = match hook {
        Hook::Connect4 => libbpf_sys::BPF_CGROUP_INET4_CONNECT,
        Hook::Getsockopt => libbpf_sys::BPF_CGROUP_GETSOCKOPT,
    };
    // A cgroup has at most 64 programs per attach type.
    let mut ids = [0u32; 64];
    let mut count = ids.len() as u32;
    let mut flags = 0u32;
    // SAFETY: ids has room for `count` ids; the kernel writes at most that.
    let r = unsafe {
        libbpf_sys::bpf_prog_query(
            dir.as_raw_fd(),
            ty,
            0,
            &mut flags,
            ids.as_mut_ptr(),
            &mut count,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(-r));
    }
    let mut progs = Vec::new();
    for &id in &ids[..(count as usize).min(ids.len())] {
        // A program detached meanwhile is simply gone.
        if let Ok(p) = program_info(id) {
            progs.push(p);
        }
    }
    Ok(progs)
}

fn program_info(id: u32) -> io::Result<AttachedProgram> {
    // SAFETY: plain syscall wrapper; a valid descriptor is owned at once.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut map_ids = [0u32; 32];
    // SAFETY: bpf_prog_info is plain data; all-zero is valid.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    info.nr_map_ids = map_ids.len() as u32;
    info.map_ids = map_ids.as_mut_ptr() as u64;
    let mut len = size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: info is `len` bytes; map_ids has room for nr_map_ids ids.
    let r = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(
            fd.as_raw_fd(),
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(-r));
    }
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let n = (info.nr_map_ids as usize).min(map_ids.len());
    Ok(AttachedProgram {
        name: String::from_utf8_lossy(&name).into_owned(),
        map_ids: map_ids[..n].to_vec(),
    })
}
