//! `cargo xtask order`: `proxy/link-order.txt`, the functions a serving node runs, which the
//! release build lays out first and together in weft's code (`proxy/build.rs` hands the file to
//! the linker).
//!
//! Why: the kernel maps a file's pages 64 KiB at a time around each one touched. The 3.7 MB of
//! code a node runs while it serves, spread over a 22.8 MB text among the code that runs once
//! at start (the registry's parsers, the eBPF loader, certificate issuance), kept 11 MB of the
//! executable mapped. Laid out together, it maps about its own size (docs/benchmarks.md).
//!
//! How:
//! 1. the release build of weft and weft-testpod;
//! 2. the benchmark's cases, weft only, with each `weft node` run under valgrind's callgrind,
//!    counting switched on once the node answers `/healthz/ready`, has made its first
//!    certificates and has handed back what making them ran, and then only while the bench
//!    runs its cases, not while it checks its paths ([`crate::bench::MEASURING_ENV`]):
//!    start-up's code is left out, and so are the certificates' and the checks' (a tunnel's
//!    first TLS handshake), which would otherwise fall in whichever part's count they happened
//!    to come in. In three
//!    parts ([`STAGES`]): one node serving HTTP, one node serving TCP, two nodes carrying both
//!    in HBONE;
//! 3. every function of weft's executable that ran, part by part, each part's functions that
//!    no earlier part ran by the instructions they ran, most first: the file's lines. A node
//!    that serves what the first part measured maps that part's code and no more;
//! 4. at the end of the first part, what callgrind cannot show: the slow paths of contended
//!    locks ([`CONTENDED`]; callgrind runs one thread at a time).
//!
//! Symbols are mangled names with a hash of their crate's build; a function the file does not
//! name (new code, or a build whose hashes changed) is laid out where it would be without the
//! file. Run it again after changes to the data path or to dependencies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::{release_dir, require_root, setup, workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measured time of each benchmark case, in milliseconds (each also warms up for 300); the
    /// node runs about 50 times slower under callgrind.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    pub case_ms: u64,
}

/// The file the release build reads, relative to the workspace.
const ORDER_FILE: &str = "proxy/link-order.txt";

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    require_root("the benchmark's clusters are network namespaces")?;
    crate::cargo(&["build", "--release", "--bins"])?;
    let dir = order_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let weft = release_dir().join("weft");
    let wrapper = dir.join("weft-callgrind");
    write_wrapper(&wrapper, &weft, &dir)?;
    let object = weft.to_string_lossy();
    // Read first: a binary whose lock functions are not found fails before the stages' minutes.
    let unseen = contended(&symbols(&weft)?);
    if unseen.is_empty() {
        bail!(
            "no function of {object} starts with any of {CONTENDED:?}: the locks' slow paths \
             would go unlaid out (rename the prefixes to what the binary names them now)"
        );
    }

    let mut stages = Vec::new();
    let measuring = dir.join(MEASURING);
    std::env::set_var(crate::bench::MEASURING_ENV, &measuring);
    for (i, (what, only)) in STAGES.iter().enumerate() {
        eprintln!("order: {what}");
        let _ = std::fs::remove_file(&measuring);
        crate::bench::run_short(&wrapper, "weft", args.case_ms, only)?;
        // This stage's outputs, kept apart from the next one's.
        let kept = dir.join(format!("stage-{i}"));
        std::fs::create_dir_all(&kept)?;
        let mut counts = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("callgrind."))
            {
                counts.push(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                );
                std::fs::rename(&path, kept.join(path.file_name().unwrap_or_default()))?;
            }
        }
        let late = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(NO_CERTIFICATE));
        if late {
            bail!(
                "a node under callgrind made no certificate within 30 s in {what}: its counts \
                 would hold start-up's certificate code (outputs in {})",
                kept.display()
            );
        }
        let hot = hot_functions(counts.iter().map(String::as_str), &object);
        if hot.is_empty() {
            bail!(
                "callgrind counted no function of {object} in {what} (outputs in {})",
                kept.display()
            );
        }
        stages.push((*what, hot));
    }
    let mut order = first_needed(&stages);
    add_unseen(&mut order, unseen);
    let out = workspace_root().join(ORDER_FILE);
    std::fs::write(&out, render(&order)).with_context(|| format!("writing {}", out.display()))?;
    let functions: usize = order.iter().map(|(_, names)| names.len()).sum();
    eprintln!(
        "order: {functions} functions in {} (rebuild to use it: cargo build --release)",
        out.display()
    );
    Ok(())
}

/// What the callgrind wrapper leaves in the output directory (with the node's process id) when
/// a node made no certificate in time: counting started anyway, and the stage is refused.
const NO_CERTIFICATE: &str = "no-certificate.";

/// The file that is in the output directory while the bench runs its cases: the wrapper counts
/// while it is there.
const MEASURING: &str = "measuring";

/// The benchmark's cases, in the order their code is laid out: what a node serving HTTP on
/// its own runs, then what plain TCP adds to it, then what carrying traffic to and from other
/// nodes in HBONE adds. A node maps the code of what it serves: one that serves no HBONE
/// leaves its code (about 1.1 MB) unmapped.
const STAGES: [(&str, &[&str]); 3] = [
    ("one node, HTTP", &["--only", "single-node", "--no-tcp"]),
    ("one node, TCP", &["--only", "single-node", "--no-http"]),
    ("two nodes, HBONE", &["--only", "cross-node"]),
];

/// What no count can show: callgrind runs one thread at a time, so no lock is ever contended
/// under it, and the slow paths of the locks two workers take at once (parking_lot's, which
/// tokio's scheduler uses too, and the standard library's) never run there. A node serving
/// HTTP on two workers runs them in its first seconds: demangled names starting with these
/// are laid out at the end of the first part.
const CONTENDED: [&str; 3] = ["parking_lot::", "parking_lot_core::", "<std::sys::sync::"];

/// The functions of `symbols` (mangled and demangled names, as [`symbols`] reads them) that
/// [`CONTENDED`] names, in the order given.
fn contended(symbols: &[(String, String)]) -> Vec<String> {
    symbols
        .iter()
        .filter(|(_, shown)| CONTENDED.iter().any(|p| shown.starts_with(p)))
        .map(|(name, _)| name.clone())
        .collect()
}

/// `names` added to the end of the first part, but those some part already has.
fn add_unseen(order: &mut [(&str, Vec<String>)], names: Vec<String>) {
    let seen: std::collections::HashSet<String> =
        order.iter().flat_map(|(_, n)| n.iter().cloned()).collect();
    if let Some((_, first)) = order.first_mut() {
        let mut added = std::collections::HashSet::new();
        first.extend(
            names
                .into_iter()
                .filter(|n| !seen.contains(n) && added.insert(n.clone())),
        );
    }
}

/// The functions `object` defines: each mangled name with its demangled one (`nm`, with and
/// without `-C`, both in the symbol table's order).
fn symbols(object: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let nm = |demangle: bool| -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new("nm");
        cmd.args(["--defined-only", "--no-sort"]);
        if demangle {
            cmd.arg("-C");
        }
        let out = cmd
            .arg(object)
            .output()
            .with_context(|| format!("nm {}", object.display()))?;
        if !out.status.success() {
            bail!(
                "nm {}: {}",
                object.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (plain, shown) = (nm(false)?, nm(true)?);
    // `ADDRESS KIND NAME`: functions are `t`/`T`; a demangled name may hold spaces.
    let function = |l: &str| {
        let mut f = l.splitn(3, ' ');
        let (_, kind, name) = (f.next()?, f.next()?, f.next()?);
        matches!(kind, "t" | "T").then(|| name.to_string())
    };
    let pairs: Vec<(String, String)> = plain
        .lines()
        .zip(shown.lines())
        .filter_map(|(p, s)| Some((function(p)?, function(s)?)))
        .collect();
    if plain.lines().count() != shown.lines().count() {
        bail!("nm listed {} differently with -C", object.display());
    }
    Ok(pairs)
}

/// Each stage's functions that no earlier stage ran, most run first: the stages' hot
/// functions ([`hot_functions`]) laid one after the other.
fn first_needed<'a>(stages: &[(&'a str, Vec<String>)]) -> Vec<(&'a str, Vec<String>)> {
    let mut seen = std::collections::HashSet::new();
    stages
        .iter()
        .map(|(what, hot)| {
            let new = hot.iter().filter(|n| seen.insert(n.as_str())).cloned();
            (*what, new.collect())
        })
        .collect()
}

/// How a weft executable is laid out against `proxy/link-order.txt`, for the benchmark's notes
/// (read with `nm`); `None` when there is no file or `nm` fails.
pub fn layout_note(weft: &Path) -> Option<String> {
    let order = std::fs::read_to_string(workspace_root().join(ORDER_FILE)).ok()?;
    let out = std::process::Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(weft)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let l = Layout::of(&order, &String::from_utf8_lossy(&out.stdout));
    let mb = |b: u64| b as f64 / 1e6;
    let mut note = format!(
        "weft's code layout: {} of the {} functions {ORDER_FILE} names are in {}, \
         {:.2} MB of code spanning {:.2} MB",
        l.found,
        l.listed,
        weft.display(),
        mb(l.size),
        mb(l.span),
    );
    if l.found * 10 < l.listed * 9 {
        note.push_str(" (the file is stale for this build: `cargo xtask order` writes it again)");
    } else if l.span > l.size + l.size / 10 {
        note.push_str(" (not laid out together: not a release build of this tree?)");
    }
    Some(note)
}

/// The functions an order file names, and where an executable has them.
#[derive(Debug, PartialEq)]
struct Layout {
    /// Names in the file.
    listed: usize,
    /// Of them, symbols the executable defines.
    found: usize,
    /// Their code, in bytes.
    size: u64,
    /// From the first of them to the end of the last, in bytes.
    span: u64,
}

impl Layout {
    /// `order`: the file (`#` comments); `nm`: `nm -S --defined-only` of the executable.
    fn of(order: &str, nm: &str) -> Layout {
        let symbols: HashMap<&str, (u64, u64)> = nm
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (addr, size, _kind, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
                let hex = |s| u64::from_str_radix(s, 16).ok();
                Some((name, (hex(addr)?, hex(size)?)))
            })
            .collect();
        let names: Vec<&str> = order
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .collect();
        let found: Vec<(u64, u64)> = names
            .iter()
            .filter_map(|n| symbols.get(n).copied())
            .collect();
        let start = found.iter().map(|&(a, _)| a).min().unwrap_or(0);
        let end = found.iter().map(|&(a, s)| a + s).max().unwrap_or(0);
        Layout {
            listed: names.len(),
            found: found.len(),
            size: found.iter().map(|&(_, s)| s).sum(),
            span: end - start,
        }
    }
}

/// `weft` for every command but `node`, which runs under callgrind with counting off until
/// its admin socket answers ready and its first certificates are made (up to 30 s; past that it
/// counts anyway and leaves a [`NO_CERTIFICATE`] file for the stage to refuse), the node has
/// handed back what making them ran; from then on it counts while the bench runs its cases
/// (while the [`MEASURING`] file is there).
/// SIGTERM (how the bench stops a node) is passed on, and the node's exit status returned.
fn write_wrapper(path: &Path, weft: &Path, dir: &Path) -> anyhow::Result<()> {
    let script = format!(
        r#"#!/bin/bash
# weft under callgrind for `cargo xtask order` (generated).
weft='{weft}'
case " $* " in *" node "*) ;; *) exec "$weft" "$@" ;; esac
sock=; prev=
for a in "$@"; do [ "$prev" = --admin-socket ] && sock=$a; prev=$a; done
valgrind --tool=callgrind --demangle=no --instr-atstart=no \
  --callgrind-out-file='{dir}/callgrind.%p' "$weft" "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
(
  until curl -sf --unix-socket "$sock" http://weft/healthz/ready >/dev/null; do
    kill -0 $pid 2>/dev/null || exit 0
    sleep 0.2
  done
  # The node's first certificates (and what it hands back after them) are start-up's too:
  # counted, they would land in whichever part's count they happened to fall into.
  certified=
  for _ in $(seq 150); do
    curl -sf --unix-socket "$sock" http://weft/certs | grep -q serial && certified=1 && break
    kill -0 $pid 2>/dev/null || exit 0
    sleep 0.2
  done
  [ -n "$certified" ] || : > '{dir}/{no_certificate}'$pid
  sleep 5
  # The bench's checks (a tunnel's first handshake) are set-up too: count its cases only.
  counting=
  while kill -0 $pid 2>/dev/null; do
    if [ -e '{dir}/{measuring}' ]; then
      [ -n "$counting" ] || {{ callgrind_control -i on $pid >/dev/null; counting=1; }}
    else
      [ -z "$counting" ] || {{ callgrind_control -i off $pid >/dev/null; counting=; }}
    fi
    sleep 0.2
  done
) &
# `wait` returns early when a trapped signal comes: wait again while the node runs.
while :; do
  wait $pid; rc=$?
  kill -0 $pid 2>/dev/null || break
done
exit $rc
"#,
        weft = weft.display(),
        dir = dir.display(),
        no_certificate = NO_CERTIFICATE,
        measuring = MEASURING,
    );
    std::fs::write(path, script).with_context(|| format!("writing {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The functions of `object` that ran in any of the callgrind outputs `counts` (written with
/// `--demangle=no`), by the instructions they ran themselves, most first; ties by name.
pub fn hot_functions<'a>(counts: impl IntoIterator<Item = &'a str>, object: &str) -> Vec<String> {
    let mut cost: HashMap<String, u64> = HashMap::new();
    for text in counts {
        // callgrind's name compression: `fn=(7) name` names id 7 the first time, `fn=(7)`
        // after; objects (`ob=`, `cob=`) and called functions (`cfn=`) likewise.
        let mut objects: HashMap<&str, &str> = HashMap::new();
        let mut functions: HashMap<&str, &str> = HashMap::new();
        let mut current: Option<&str> = None;
        let mut in_object = false;
        let mut after_calls = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("ob=") {
                in_object = compressed(rest, &mut objects) == Some(object);
            } else if let Some(rest) = line.strip_prefix("cob=") {
                compressed(rest, &mut objects);
            } else if let Some(rest) = line.strip_prefix("fn=") {
                // A function entered recursively is named `name'2`.
                current =
                    compressed(rest, &mut functions).map(|f| f.split('\'').next().unwrap_or(f));
            } else if let Some(rest) = line.strip_prefix("cfn=") {
                compressed(rest, &mut functions);
            } else if line.starts_with("calls=") {
                // The cost line after `calls=` is the call's (inclusive), not the caller's own.
                after_calls = true;
            } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
                if std::mem::take(&mut after_calls) {
                    continue;
                }
                let (Some(name), true) = (current, in_object) else {
                    continue;
                };
                let ir = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                if ir > 0 && !name.starts_with("0x") {
                    *cost.entry(name.to_string()).or_default() += ir;
                }
            }
        }
    }
    let mut hot: Vec<(String, u64)> = cost.into_iter().collect();
    hot.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    hot.into_iter().map(|(name, _)| name).collect()
}

/// `(id) name` (names id) or `(id)` (names what id named before); returns the name.
fn compressed<'a>(field: &'a str, names: &mut HashMap<&'a str, &'a str>) -> Option<&'a str> {
    let rest = field.strip_prefix('(')?;
    let (id, name) = rest.split_once(')')?;
    let name = name.trim_start();
    if name.is_empty() {
        names.get(id).copied()
    } else {
        names.insert(id, name);
        Some(name)
    }
}

fn render(order: &[(&str, Vec<String>)]) -> String {
    let mut out = String::from(
        "# The functions a serving weft node runs: the release build lays them out together at\n\
         # the start of its code (proxy/build.rs), by what a node serves (each part's functions\n\
         # that no earlier part ran, most run first). Written by `cargo xtask order`; run it\n\
         # again after changes to the data path or to dependencies.\n",
    );
    for (what, names) in order {
        out.push_str(&format!("# {what}: {} functions\n", names.len()));
        for name in names {
            out.push_str(name);
            out.push('\n');
        }
    }
    out
}

/// Where the callgrind outputs go: `target/order` (or `$CARGO_TARGET_DIR/order`).
fn order_dir() -> PathBuf {
    release_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("order")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A callgrind output as `--demangle=no` writes it (names compressed, a call's cost line,
    /// another object, a recursive entry).
    const OUT: &str = "# callgrind format\nversion: 1\nevents: Ir\n\
        ob=(1) /t/weft\nfl=(1) a.rs\nfn=(1) _ZN4weft3hot\n10 500\n+1 20\n\
        cfl=(1)\ncfn=(2) _ZN4weft4cold\ncalls=3 5\n+2 9000\n\
        fn=(2)\n5 30\n\
        ob=(2) /usr/lib/libc.so.6\nfn=(3) memcpy\n1 99999\n\
        ob=(1)\nfn=(4) _ZN4weft4rec'2\n7 40\nfn=(1)\n11 100\n";

    #[test]
    fn functions_of_the_object_by_their_own_instructions() {
        let order = hot_functions([OUT], "/t/weft");
        assert_eq!(
            order,
            ["_ZN4weft3hot", "_ZN4weft4rec", "_ZN4weft4cold"].map(String::from),
            "hot: 620 (the call's 9000 is cold's), rec: 40, cold: 30; libc's memcpy is not weft's"
        );
    }

    #[test]
    fn a_layout_is_where_the_named_functions_are() {
        let order = "# comment\n_ZN1a\n_ZN1b\n_ZN1c\n";
        let together = "0000000000001000 0000000000000100 t _ZN1a\n\
            0000000000001100 0000000000000080 T _ZN1b\n\
            0000000000009000 0000000000000010 t _ZN1z\n\
            0000000000002000 D _data_without_size\n";
        assert_eq!(
            Layout::of(order, together),
            Layout {
                listed: 3,
                found: 2,
                size: 0x180,
                span: 0x180
            }
        );
        let apart = "0000000000001000 0000000000000100 t _ZN1a\n\
            0000000000009000 0000000000000100 t _ZN1b\n";
        assert_eq!(Layout::of(order, apart).span, 0x8100);
        assert_eq!(Layout::of(order, "").found, 0);
    }

    #[test]
    fn the_slow_paths_of_contended_locks_end_the_first_part() {
        let symbols: Vec<(String, String)> = [
            (
                "_ZN11parking_lot10raw_rwlock9RawRwLock16lock_shared_slow17h1E",
                "parking_lot::raw_rwlock::RawRwLock::lock_shared_slow",
            ),
            (
                "_RNvMNtNtNtNtCs1_3std3sys4sync5mutex5futexNtB2_5Mutex14lock_contended",
                "<std::sys::sync::mutex::futex::Mutex>::lock_contended",
            ),
            ("_ZN4weft5relay4pump17h2E", "weft::relay::pump"),
            (
                "_ZN17parking_lot_core11parking_lot10ThreadData3new17h3E",
                "parking_lot_core::parking_lot::ThreadData::new",
            ),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into();
        let unseen = contended(&symbols);
        assert_eq!(unseen.len(), 3);
        let mut order = vec![
            ("http", vec!["_ZN4weft3hot".to_string()]),
            (
                "tcp",
                vec!["_ZN17parking_lot_core11parking_lot10ThreadData3new17h3E".to_string()],
            ),
        ];
        add_unseen(&mut order, unseen);
        assert_eq!(
            order[0].1,
            [
                "_ZN4weft3hot",
                "_ZN11parking_lot10raw_rwlock9RawRwLock16lock_shared_slow17h1E",
                "_RNvMNtNtNtNtCs1_3std3sys4sync5mutex5futexNtB2_5Mutex14lock_contended",
            ]
        );
        assert_eq!(order[1].1.len(), 1, "a part that has one keeps it");
    }

    #[test]
    fn each_part_adds_what_no_earlier_part_ran() {
        let hot = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let stages = [
            ("http", hot(&["serve", "accept", "parse"])),
            ("tcp", hot(&["copy", "accept"])),
            ("hbone", hot(&["accept", "tls", "serve", "frame"])),
        ];
        let order = first_needed(&stages);
        assert_eq!(
            order,
            [
                ("http", hot(&["serve", "accept", "parse"])),
                ("tcp", hot(&["copy"])),
                ("hbone", hot(&["tls", "frame"])),
            ]
        );
        let file = render(&order);
        assert!(file.contains("# tcp: 1 functions\ncopy\n# hbone: 2 functions\ntls\nframe\n"));
        let names: Vec<&str> = file.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(names, ["serve", "accept", "parse", "copy", "tls", "frame"]);
    }

    /// The wrapper is a script bash reads, with the paths and the marker written in.
    #[test]
    fn the_wrapper_is_a_valid_script() {
        let dir = std::env::temp_dir().join(format!("weft-order-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weft-callgrind");
        write_wrapper(&path, Path::new("/t/weft"), &dir).unwrap();
        let script = std::fs::read_to_string(&path).unwrap();
        let checked = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(checked.success(), "bash -n refused:\n{script}");
        assert!(script.contains(&format!("'{}/{NO_CERTIFICATE}'$pid", dir.display())));
        assert!(script.contains(&format!("if [ -e '{}/{MEASURING}' ]", dir.display())));
    }

    #[test]
    fn outputs_add_up() {
        let other = "ob=(1) /t/weft\nfn=(9) _ZN4weft4cold\n1 1000\n";
        let order = hot_functions([OUT, other], "/t/weft");
        assert_eq!(order[0], "_ZN4weft4cold", "30 + 1000 now");
        assert!(hot_functions([OUT], "/other").is_empty());
    }
}
