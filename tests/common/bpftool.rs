//! What the kernel has attached and loaded, as bpftool shows it (its `-j`
//! JSON output, read with serde_json).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::process::{describe, need, run_within, scaled, stdout, wait_until};
use super::proxy::Proxy;

/// `bpftool -j ARGS`, parsed; no output at all is an empty array.
///
/// bpftool lists objects by id and then opens each; one that another test's
/// ktproxy releases in between makes it fail ("can't get link by id (N)").
/// That says nothing about the object asked for: ask again.
fn bpftool_json(args: &[&str]) -> Value {
    let mut attempt = 0;
    loop {
        let o = run_within(
            Command::new("bpftool").arg("-j").args(args),
            Duration::from_secs(20),
        );
        let vanished = stdout(&o).contains("can't get") && stdout(&o).contains("by id");
        if o.status.success() || !vanished || attempt == 5 {
            assert!(o.status.success(), "bpftool -j {args:?}: {}", describe(&o));
            return parse(&stdout(&o), args);
        }
        attempt += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn parse(text: &str, args: &[&str]) -> Value {
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bpftool -j {args:?}: {e}: {text}"))
}

/// The elements of a JSON array; empty for anything else.
fn array(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// A program attached to a cgroup, as `bpftool cgroup show` lists it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
}

/// Programs attached directly to the cgroup `path` (not inherited ones).
/// A cgroup that does not exist (any more) has none.
pub fn attached(path: &Path) -> Vec<Attached> {
    let p = path.to_str().expect("UTF-8 cgroup path");
    let args = ["cgroup", "show", p];
    let o = run_within(
        Command::new("bpftool").arg("-j").args(args),
        Duration::from_secs(20),
    );
    if !o.status.success() && !path.exists() {
        return Vec::new();
    }
    assert!(
        o.status.success(),
        "bpftool cgroup show {p}: {}",
        describe(&o)
    );
    array(&parse(&stdout(&o), &args))
        .iter()
        .map(|e| Attached {
            id: e["id"].as_u64().unwrap_or(0),
            name: e["name"].as_str().unwrap_or("").into(),
            attach_type: e["attach_type"].as_str().unwrap_or("").into(),
        })
        .collect()
}

/// Names of the programs attached to the cgroup `path`.
pub fn attached_programs(path: &Path) -> Vec<String> {
    attached(path).into_iter().map(|a| a.name).collect()
}

/// Waits up to `timeout` for the cgroup to have no programs attached;
/// returns what is still attached on timeout.
pub fn wait_detached(path: &Path, timeout: Duration) -> Vec<String> {
    let mut left = Vec::new();
    wait_until(timeout, || {
        left = attached_programs(path);
        left.is_empty()
    });
    left
}

/// The id of the map called `name` that the running `proxy` uses. With a
/// bpftool that lists map owners (`pids`), by pid; otherwise through the
/// programs attached to ktproxy's own cgroup, which only it uses.
pub fn proxy_map_id(proxy: &Proxy, name: &str) -> u64 {
    let maps = bpftool_json(&["map", "show"]);
    let named: Vec<&Value> = array(&maps).iter().filter(|m| m["name"] == name).collect();
    if named.iter().any(|m| m.get("pids").is_some()) {
        let owned = named.iter().find(|m| {
            array(&m["pids"])
                .iter()
                .any(|e| e["pid"].as_u64() == Some(proxy.pid() as u64))
        });
        return owned
            .and_then(|m| m["id"].as_u64())
            .unwrap_or_else(|| panic!("no map {name} held by pid {}", proxy.pid()));
    }
    for prog in attached(proxy.own_cgroup()) {
        let info = bpftool_json(&["prog", "show", "id", &prog.id.to_string()]);
        for id in array(&info["map_ids"]) {
            let Some(id) = id.as_u64() else { continue };
            let map = bpftool_json(&["map", "show", "id", &id.to_string()]);
            if map["name"] == name {
                return id;
            }
        }
    }
    panic!(
        "no map {name} among the programs attached to {}",
        proxy.own_cgroup().display()
    )
}

/// Number of entries in the map with this id.
pub fn map_entry_count(id: u64) -> usize {
    array(&bpftool_json(&["map", "dump", "id", &id.to_string()])).len()
}

/// `bpftool cgroup tree` (text), which lists every cgroup with programs.
/// bpftool gives up when a cgroup disappears while it walks the hierarchy
/// (other ktproxy instances of concurrent tests come and go): try again.
pub fn bpftool_cgroup_tree() -> String {
    let bpftool = need("bpftool");
    let mut last = None;
    for _ in 0..50 {
        let o = run_within(
            Command::new(&bpftool).args(["cgroup", "tree"]),
            Duration::from_secs(20),
        );
        if o.status.success() {
            return stdout(&o);
        }
        last = Some(o);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("bpftool cgroup tree: {}", describe(&last.unwrap()));
}

/// The cgroup paths in `bpftool cgroup tree` output that belong to the
/// ktproxy with this pid (its own cgroup or its command's).
pub fn tree_mentions(tree: &str, pid: u32) -> Vec<String> {
    let own = format!("/ktproxy-{pid}");
    let cmd = format!("/ktproxy-{pid}-cmd");
    tree.split_whitespace()
        .filter(|w| w.ends_with(&own) || w.ends_with(&cmd))
        .map(String::from)
        .collect()
}

/// `bpftool -j cgroup tree`, parsed: (cgroup path, program id, name) for
/// every program attached anywhere in the hierarchy, links and legacy
/// attachments alike. Retried like `bpftool_cgroup_tree`.
pub fn cgroup_tree_programs() -> Vec<(String, u64, String)> {
    let bpftool = need("bpftool");
    let mut last = None;
    for _ in 0..50 {
        let o = run_within(
            Command::new(&bpftool).args(["-j", "cgroup", "tree"]),
            Duration::from_secs(20),
        );
        if o.status.success() {
            let tree = parse(&stdout(&o), &["cgroup", "tree"]);
            return array(&tree)
                .iter()
                .flat_map(|cg| {
                    let path = cg["cgroup"].as_str().unwrap_or("").to_string();
                    array(&cg["programs"])
                        .iter()
                        .map(move |p| {
                            (
                                path.clone(),
                                p["id"].as_u64().unwrap_or(0),
                                p["name"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
        }
        last = Some(o);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("bpftool -j cgroup tree: {}", describe(&last.unwrap()));
}

/// Loaded `ktproxy_*` programs that nothing attaches: no link refers to
/// them and no cgroup lists them. Every program ktproxy loads is attached
/// while it runs (by a link, or as COMMAND's guard), so such a program was
/// left behind: a legacy attachment to a cgroup that is gone but not yet
/// released, or a leak. Only those still orphaned a second (scaled) later count
/// (a ktproxy between loading and attaching is one for a moment).
fn orphan_programs() -> Vec<(u64, String)> {
    let orphans = || -> Vec<(u64, String)> {
        let linked: HashSet<u64> = array(&bpftool_json(&["link", "show"]))
            .iter()
            .filter_map(|l| l["prog_id"].as_u64())
            .collect();
        let attached: HashSet<u64> = cgroup_tree_programs().into_iter().map(|p| p.1).collect();
        array(&bpftool_json(&["prog", "show"]))
            .iter()
            .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
            .filter(|(id, name)| {
                name.starts_with("ktproxy_") && !linked.contains(id) && !attached.contains(id)
            })
            .collect()
    };
    let first = orphans();
    if first.is_empty() {
        return first;
    }
    // Loading and verifying takes longer where the CPU is emulated: scaled.
    std::thread::sleep(scaled(Duration::from_secs(1)));
    let second = orphans();
    first.into_iter().filter(|p| second.contains(p)).collect()
}

/// What the kernel still holds for the ktproxy with this pid, which has
/// exited: programs attached to its cgroups (`ktproxy-<pid>`,
/// `ktproxy-<pid>-cmd`) if they still exist, and `ktproxy_*` programs
/// attached nowhere (see `orphan_programs`). Empty when nothing is left.
pub fn bpf_leftovers(pid: u32) -> Vec<String> {
    let own = format!("/ktproxy-{pid}");
    let cmd = format!("/ktproxy-{pid}-cmd");
    let mut left: Vec<String> = cgroup_tree_programs()
        .into_iter()
        .filter(|(path, _, _)| path.ends_with(&own) || path.ends_with(&cmd))
        .map(|(path, id, name)| format!("{name} (program {id}) attached to {path}"))
        .collect();
    left.extend(
        orphan_programs()
            .into_iter()
            .map(|(id, name)| format!("{name} (program {id}) loaded, attached nowhere")),
    );
    left
}

/// Whether the program with this id is still loaded.
pub fn program_loaded(id: u64) -> bool {
    let o = run_within(
        Command::new(need("bpftool")).args(["-j", "prog", "show", "id", &id.to_string()]),
        Duration::from_secs(20),
    );
    o.status.success()
}
