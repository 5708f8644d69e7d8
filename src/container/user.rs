//! Users and groups of a container, resolved in its image's `/etc/passwd` and `/etc/group`
//! the way Docker and containerd do:
//!
//! - `"name"` must exist in `/etc/passwd`; its uid and primary gid come from there;
//! - `"uid"` is looked up too, but a uid without an entry is fine (primary gid 0);
//! - `"user:group"`: each side is numeric or a name (a name must exist in its file);
//! - the additional gids are the primary gid, the groups of `/etc/group` that list the user
//!   as a member (unless the policy is strict), and the pod's supplemental groups.
//!
//! The files are read through the rootfs: symlinks inside the image are followed but never
//! out of it, so an image cannot make berth read a host file (CVE-2023-25173 class). What is
//! read is bounded: only a regular file is opened (`O_NOFOLLOW|O_NONBLOCK`, so a fifo or a
//! device node planted at `/etc/passwd` can neither hang berthd nor stream forever), and a
//! file over [`MAX_DB_BYTES`] is refused with [`UserError::TooLarge`] before it is read.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Errors resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
    #[error("invalid user {0:?}")]
    Invalid(String),
    #[error("the image's {path} is {size} bytes, over the limit of {MAX_DB_BYTES} berth reads")]
    TooLarge { path: String, size: u64 },
    #[error("the image's {path} is not a regular file ({kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("reading {path} of the image: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The largest `/etc/passwd` or `/etc/group` berth reads (distribution images hold a few KiB;
/// 4 MiB is tens of thousands of entries).
pub const MAX_DB_BYTES: u64 = 4 << 20;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` text; malformed lines (and NIS `+`/`-` lines) are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).unwrap_or(&"").to_string(),
                shell: f.get(6).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
                return None;
            }
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// `path` (absolute, inside the container) resolved under `root`, following symlinks as the
/// container would see them: `..` and absolute link targets never leave `root`.
pub fn scoped_path(root: &Path, path: &str) -> std::io::Result<PathBuf> {
    const MAX_LINKS: usize = 40;
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = components(Path::new(path));
    pending.reverse(); // a stack: the next component is at the end
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::other(format!(
                        "too many levels of symbolic links resolving {path}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// The image's user database (`None`: the file does not exist).
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    pub passwd: Option<Vec<PasswdEntry>>,
    pub group: Option<Vec<GroupEntry>>,
}

impl UserDb {
    /// Reads `/etc/passwd` and `/etc/group` of a rootfs; missing files are fine.
    pub fn load(rootfs: &Path) -> Result<UserDb, UserError> {
        Ok(UserDb {
            passwd: read_optional(rootfs, "/etc/passwd")?.map(|t| parse_passwd(&t)),
            group: read_optional(rootfs, "/etc/group")?.map(|t| parse_group(&t)),
        })
    }

    fn user_by_name(&self, name: &str) -> Option<&PasswdEntry> {
        self.passwd.as_ref()?.iter().find(|e| e.name == name)
    }
    fn user_by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.passwd.as_ref()?.iter().find(|e| e.uid == uid)
    }
    fn group_by_name(&self, name: &str) -> Option<&GroupEntry> {
        self.group.as_ref()?.iter().find(|e| e.name == name)
    }
}

fn read_optional(rootfs: &Path, path: &str) -> Result<Option<String>, UserError> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let io = |source| UserError::Io {
        path: PathBuf::from(path),
        source,
    };
    let full = scoped_path(rootfs, path).map_err(io)?;
    // `scoped_path` resolved every symlink; O_NOFOLLOW keeps it that way for the last
    // component, O_NONBLOCK keeps a fifo from blocking the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&full);
    let file = match file {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(UserError::NotRegular {
                path: path.to_string(),
                kind: "a symlink",
            });
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a fifo"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(UserError::NotRegular {
            path: path.to_string(),
            kind,
        });
    }
    if meta.len() > MAX_DB_BYTES {
        return Err(UserError::TooLarge {
            path: path.to_string(),
            size: meta.len(),
        });
    }
    // The size may change under us (it does not in an image, but the read is bounded anyway).
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_DB_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_DB_BYTES {
        return Err(UserError::TooLarge {
            path: path.to_string(),
            size: bytes.len() as u64,
        });
    }
    Ok(Some(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// What to resolve: a user (name or uid), an optional group (name or gid), and the groups
/// the pod adds.
#[derive(Debug, Clone, Default)]
pub struct UserRequest<'a> {
    pub user: &'a str,
    pub group: Option<&'a str>,
    pub supplemental_groups: &'a [u32],
    /// Add the groups `/etc/group` lists the user in (CRI `SupplementalGroupsPolicy::Merge`).
    pub merge_image_groups: bool,
}

/// The ids a container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Sorted, without duplicates, including the primary gid.
    pub additional_gids: Vec<u32>,
}

/// Splits an image `User` (`user`, `user:group`) into its parts.
pub fn split_user(spec: &str) -> Result<(&str, Option<&str>), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    Ok((user, group))
}

/// Resolves a request against a rootfs.
pub fn resolve(rootfs: &Path, req: &UserRequest<'_>) -> Result<ResolvedUser, UserError> {
    let db = UserDb::load(rootfs)?;
    resolve_in(&db, req)
}

/// Resolves a request against a loaded user database.
pub fn resolve_in(db: &UserDb, req: &UserRequest<'_>) -> Result<ResolvedUser, UserError> {
    if req.user.is_empty() || req.user.contains(':') {
        return Err(UserError::Invalid(req.user.to_string()));
    }
    let (uid, mut gid, name) = match req.user.parse::<u32>() {
        Ok(uid) => match db.user_by_uid(uid) {
            Some(e) => (uid, e.gid, Some(e.name.clone())),
            None => (uid, 0, None),
        },
        Err(_) => match db.user_by_name(req.user) {
            Some(e) => (e.uid, e.gid, Some(e.name.clone())),
            None => return Err(UserError::UnknownUser(req.user.to_string())),
        },
    };
    if let Some(group) = req.group {
        if group.is_empty() {
            return Err(UserError::Invalid(format!("{}:", req.user)));
        }
        gid = match group.parse::<u32>() {
            Ok(g) => g,
            Err(_) => match db.group_by_name(group) {
                Some(g) => g.gid,
                None => return Err(UserError::UnknownGroup(group.to_string())),
            },
        };
    }
    let mut gids: BTreeSet<u32> = BTreeSet::new();
    gids.insert(gid);
    if req.merge_image_groups
        && let (Some(name), Some(groups)) = (name.as_deref(), db.group.as_ref())
    {
        for g in groups {
            // Only groups the user is listed in; the user's own group is the primary one.
            if g.name != name && g.members.iter().any(|m| m == name) {
                gids.insert(g.gid);
            }
        }
    }
    gids.extend(req.supplemental_groups.iter().copied());
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: gids.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1::/:/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        broken:x:notanumber:1::/:\n\
        bob:x:1001:100::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:alice\n\
        alice:x:1000:alice\n\
        wheel:x:10:root,alice\n\
        video:x:44:bob , alice\n";

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir etc");
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).expect("write passwd");
        std::fs::write(dir.path().join("etc/group"), GROUP).expect("write group");
        dir
    }

    fn req(user: &str) -> UserRequest<'_> {
        UserRequest {
            user,
            group: None,
            supplemental_groups: &[],
            merge_image_groups: true,
        }
    }

    #[test]
    fn parses_files_skipping_bad_lines() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 4);
        assert_eq!(p[2].name, "alice");
        assert_eq!(p[2].home, "/home/alice");
        let g = parse_group(GROUP);
        assert_eq!(g[4].members, vec!["bob", "alice"]);
        assert!(g[0].members.is_empty());
    }

    #[test]
    fn names_numbers_and_groups() {
        let dir = rootfs();
        let r = resolve(dir.path(), &req("alice")).expect("alice");
        assert_eq!((r.uid, r.gid), (1000, 1000));
        assert_eq!(r.additional_gids, vec![10, 44, 100, 1000]);

        // A numeric uid finds the name (and so the groups).
        let r = resolve(dir.path(), &req("1000")).expect("1000");
        assert_eq!(r.additional_gids, vec![10, 44, 100, 1000]);

        // A uid without an entry is fine: gid 0.
        let r = resolve(dir.path(), &req("4242")).expect("4242");
        assert_eq!((r.uid, r.gid, r.additional_gids), (4242, 0, vec![0]));

        // user:group in all forms.
        let mut q = req("bob");
        q.group = Some("wheel");
        let r = resolve(dir.path(), &q).expect("bob:wheel");
        assert_eq!((r.uid, r.gid), (1001, 10));
        assert_eq!(r.additional_gids, vec![10, 44]);
        let mut q = req("5000");
        q.group = Some("6000");
        let r = resolve(dir.path(), &q).expect("5000:6000");
        assert_eq!((r.uid, r.gid), (5000, 6000));
        let mut q = req("alice");
        q.group = Some("44");
        assert_eq!(resolve(dir.path(), &q).expect("alice:44").gid, 44);

        // Strict policy and supplemental groups.
        let mut q = req("alice");
        q.merge_image_groups = false;
        q.supplemental_groups = &[7, 3, 7];
        let r = resolve(dir.path(), &q).expect("strict");
        assert_eq!(r.additional_gids, vec![3, 7, 1000]);
    }

    #[test]
    fn errors() {
        let dir = rootfs();
        assert!(matches!(
            resolve(dir.path(), &req("nobody")),
            Err(UserError::UnknownUser(u)) if u == "nobody"
        ));
        let mut q = req("alice");
        q.group = Some("nogroup");
        assert!(matches!(
            resolve(dir.path(), &q),
            Err(UserError::UnknownGroup(g)) if g == "nogroup"
        ));
        assert!(matches!(
            resolve(dir.path(), &req("")),
            Err(UserError::Invalid(_))
        ));
        assert!(split_user("a:").is_err());
        assert!(split_user(":g").is_err());
        assert_eq!(split_user("a:b").expect("a:b"), ("a", Some("b")));
        assert_eq!(split_user("7").expect("7"), ("7", None));

        // No passwd at all: numeric works, names do not.
        let empty = tempfile::tempdir().expect("tempdir");
        let r = resolve(empty.path(), &req("33")).expect("33");
        assert_eq!((r.uid, r.gid), (33, 0));
        assert!(resolve(empty.path(), &req("root")).is_err());
    }

    #[test]
    fn symlinks_stay_inside_the_rootfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("data")).expect("mkdir");
        std::fs::write(root.join("data/passwd"), "svc:x:77:78::/:/bin/sh\n").expect("write");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir etc");
        // An absolute link is taken relative to the rootfs, and `..` stops at its top.
        std::os::unix::fs::symlink("/../../../data/passwd", root.join("etc/passwd"))
            .expect("symlink");
        std::os::unix::fs::symlink("/etc/shadow-of-host", root.join("etc/group")).expect("symlink");
        let r = resolve(&root, &req("svc")).expect("svc");
        assert_eq!((r.uid, r.gid), (77, 78));
        assert_eq!(
            scoped_path(&root, "/etc/group").expect("scoped"),
            root.join("etc/shadow-of-host")
        );
        // A loop is an error, not a hang.
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        assert!(scoped_path(&root, "/loop").is_err());
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir etc");
        // A fifo would block a plain read forever.
        nix::unistd::mkfifo(
            &root.join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let e = resolve(root, &req("root")).expect_err("fifo");
        assert!(
            matches!(&e, UserError::NotRegular { kind: "a fifo", .. }),
            "{e}"
        );
        std::fs::remove_file(root.join("etc/passwd")).expect("rm");

        // A directory.
        std::fs::create_dir(root.join("etc/passwd")).expect("mkdir");
        let e = resolve(root, &req("root")).expect_err("dir");
        assert!(matches!(&e, UserError::NotRegular { .. }), "{e}");
        std::fs::remove_dir(root.join("etc/passwd")).expect("rmdir");

        // Over the limit (sparse: nothing is written): refused before it is read.
        let f = std::fs::File::create(root.join("etc/passwd")).expect("create");
        f.set_len(MAX_DB_BYTES + 1).expect("set_len");
        let e = resolve(root, &req("root")).expect_err("huge");
        assert!(
            matches!(&e, UserError::TooLarge { size, .. } if *size == MAX_DB_BYTES + 1),
            "{e}"
        );
        assert!(e.to_string().contains("over the limit"), "{e}");
        // At the limit it is read (and, all NUL bytes, holds nobody).
        f.set_len(MAX_DB_BYTES).expect("set_len");
        assert!(matches!(
            resolve(root, &req("root")),
            Err(UserError::UnknownUser(_))
        ));
        assert_eq!(resolve(root, &req("7")).expect("numeric").uid, 7);

        // Binary garbage, NUL bytes and short lines are skipped; good lines still count.
        let mut text = vec![0xffu8, 0xfe, 0x00, b'\n'];
        text.extend_from_slice(b"a\0b:x:1:1::/:/bin/sh\nonlyname\nshort:x:5\n");
        text.extend_from_slice(b"svc:x:77:78::/:/bin/sh\n");
        std::fs::write(root.join("etc/passwd"), &text).expect("write");
        assert_eq!(resolve(root, &req("svc")).expect("svc").uid, 77);
        for bad in ["onlyname", "short", "a"] {
            assert!(
                matches!(resolve(root, &req(bad)), Err(UserError::UnknownUser(_))),
                "{bad}"
            );
        }
    }
}
