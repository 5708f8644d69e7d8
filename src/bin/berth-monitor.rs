//! berth-monitor: one per pod; owns its containers' stdio so they outlive berthd.
//! See `berth::monitor` and `proto/monitor.md`.
//!
//! `berth-monitor --pod POD_ID --dir DIR [--foreground]`

use std::path::PathBuf;

use berth::monitor::server::{Options, run};

const USAGE: &str = "usage: berth-monitor --pod POD_ID --dir DIR [--foreground]";

fn main() {
    // No threads, no async runtime: `run` forks first.
    let mut dir = None;
    let mut pod_id = None;
    let mut foreground = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--dir") => dir = args.next().map(PathBuf::from),
            Some("--pod") => pod_id = args.next().and_then(|s| s.into_string().ok()),
            Some("--foreground") => foreground = true,
            Some("--version") => {
                println!("berth-monitor {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return;
            }
            _ => {
                eprintln!("berth-monitor: unexpected argument {a:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let (Some(dir), Some(pod_id)) = (dir, pod_id) else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    std::process::exit(run(&Options {
        dir,
        pod_id,
        foreground,
    }));
}
