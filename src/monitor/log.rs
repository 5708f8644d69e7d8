//! The CRI log writer: `<RFC3339Nano UTC> <stdout|stderr> <F|P> <content>\n` lines, like
//! containerd's CRI logger: a line longer than [`MAX_LOG_LINE`] is split into `P` chunks
//! and ends with an `F` chunk; a trailing `\r\n` counts as a newline; output left without a
//! newline at end of stream is written as a `P` line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest content of one log line (the kubelet's and containerd's default, 16 KiB).
pub const MAX_LOG_LINE: usize = 16 * 1024;

/// The stream of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `F`: the (end of a) full line, `P`: a partial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Full,
    Partial,
}

impl Tag {
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Full => "F",
            Tag::Partial => "P",
        }
    }
}

/// Cuts a byte stream into CRI log lines.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter::new(MAX_LOG_LINE)
    }
}

impl LineSplitter {
    /// A splitter cutting lines longer than `max` bytes (at least 1).
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            max: max.max(1),
        }
    }

    /// Feeds the next bytes of the stream; calls `emit` for every line (chunk) complete.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                emit_line(&data[..i], self.max, emit);
            } else {
                self.pending.extend_from_slice(&data[..i]);
                emit_line(&self.pending, self.max, emit);
                self.pending.clear();
            }
            data = &data[i + 1..];
        }
        self.pending.extend_from_slice(data);
        // A trailing '\r' may be half of a "\r\n": it never goes out in a partial chunk.
        let len = self.pending.len();
        let usable = if self.pending.last() == Some(&b'\r') {
            len - 1
        } else {
            len
        };
        let mut start = 0;
        while usable - start > self.max {
            emit(Tag::Partial, &self.pending[start..start + self.max]);
            start += self.max;
        }
        if start > 0 {
            self.pending.drain(..start);
        }
        if self.pending.capacity() > 4 * self.max && self.pending.len() <= self.max {
            self.pending.shrink_to(self.max);
        }
    }

    /// The stream ended: what is left (no newline) goes out as partial lines.
    pub fn finish(&mut self, emit: &mut impl FnMut(Tag, &[u8])) {
        for chunk in self.pending.chunks(self.max) {
            emit(Tag::Partial, chunk);
        }
        self.pending = Vec::new();
    }

    /// Bytes held back waiting for the end of their line.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn emit_line(line: &[u8], max: usize, emit: &mut impl FnMut(Tag, &[u8])) {
    let mut line = line.strip_suffix(b"\r").unwrap_or(line);
    while line.len() > max {
        emit(Tag::Partial, &line[..max]);
        line = &line[max..];
    }
    emit(Tag::Full, line);
}

/// `t` as RFC 3339 in UTC with nanoseconds, e.g. `2024-05-01T12:00:00.000000001Z` (the
/// fraction always has 9 digits, so lines sort and parse as Go's RFC3339Nano).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A container's CRI log file, opened for appending.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: Option<File>,
    line: Vec<u8>,
}

impl CriLog {
    /// Opens (creates, with its parent dirs, mode 0640) the log file.
    pub fn open(path: &Path) -> std::io::Result<CriLog> {
        let file = open_log(path)?;
        Ok(CriLog {
            path: path.to_path_buf(),
            file: Some(file),
            line: Vec::new(),
        })
    }

    /// Opens the file at the path again (after it was renamed or removed).
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.file = None;
        self.file = Some(open_log(&self.path)?);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one CRI line (one write, so lines of two streams never interleave).
    pub fn write_line(&mut self, stream: Stream, tag: Tag, content: &[u8]) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        self.line.clear();
        self.line
            .extend_from_slice(rfc3339_nano(SystemTime::now()).as_bytes());
        self.line.push(b' ');
        self.line.extend_from_slice(stream.as_str().as_bytes());
        self.line.push(b' ');
        self.line.extend_from_slice(tag.as_str().as_bytes());
        self.line.push(b' ');
        self.line.extend_from_slice(content);
        self.line.push(b'\n');
        let r = file.write_all(&self.line);
        if self.line.capacity() > 2 * MAX_LOG_LINE {
            self.line = Vec::new();
        }
        r
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn split(max: usize, pieces: &[&[u8]], finish: bool) -> Vec<(Tag, Vec<u8>)> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        let mut emit = |t: Tag, b: &[u8]| out.push((t, b.to_vec()));
        for p in pieces {
            s.feed(p, &mut emit);
        }
        if finish {
            s.finish(&mut emit);
        }
        out
    }

    fn l(t: Tag, s: &str) -> (Tag, Vec<u8>) {
        (t, s.as_bytes().to_vec())
    }

    #[test]
    fn full_lines_across_reads() {
        assert_eq!(
            split(16, &[b"hel", b"lo\nwor", b"ld\n\n"], true),
            vec![
                l(Tag::Full, "hello"),
                l(Tag::Full, "world"),
                l(Tag::Full, "")
            ]
        );
    }

    #[test]
    fn crlf_is_a_newline() {
        assert_eq!(
            split(16, &[b"a\r\nb\r", b"\nc\rd\n"], true),
            vec![l(Tag::Full, "a"), l(Tag::Full, "b"), l(Tag::Full, "c\rd")]
        );
    }

    #[test]
    fn long_lines_split_into_partials() {
        assert_eq!(
            split(4, &[b"abcdefghij\n"], true),
            vec![
                l(Tag::Partial, "abcd"),
                l(Tag::Partial, "efgh"),
                l(Tag::Full, "ij")
            ]
        );
        // Exactly max bytes is one full line; chunks go out before the newline arrives.
        assert_eq!(split(4, &[b"abcd\n"], false), vec![l(Tag::Full, "abcd")]);
        assert_eq!(
            split(4, &[b"abc", b"defghi"], false),
            vec![l(Tag::Partial, "abcd"), l(Tag::Partial, "efgh")]
        );
        assert_eq!(
            split(4, &[b"abc", b"defgh", b"\n"], false),
            vec![l(Tag::Partial, "abcd"), l(Tag::Full, "efgh")]
        );
        // A '\r' straddling the limit is not sent before we know whether '\n' follows.
        assert_eq!(
            split(4, &[b"abcd\r", b"\n"], false),
            vec![l(Tag::Full, "abcd")]
        );
    }

    #[test]
    fn forty_kb_line() {
        let line = vec![b'x'; 40_000];
        let mut pieces: Vec<&[u8]> = line.chunks(4096).collect();
        pieces.push(b"\n");
        let out = split(MAX_LOG_LINE, &pieces, true);
        let tags: Vec<Tag> = out.iter().map(|o| o.0).collect();
        assert_eq!(tags, vec![Tag::Partial, Tag::Partial, Tag::Full]);
        assert_eq!(out[0].1.len(), MAX_LOG_LINE);
        assert_eq!(out[1].1.len(), MAX_LOG_LINE);
        assert_eq!(out[2].1.len(), 40_000 - 2 * MAX_LOG_LINE);
    }

    #[test]
    fn eof_without_newline_is_partial() {
        assert_eq!(
            split(4, &[b"ab\ncdefgh"], true),
            vec![
                l(Tag::Full, "ab"),
                l(Tag::Partial, "cdef"),
                l(Tag::Partial, "gh")
            ]
        );
        assert_eq!(split(4, &[b"ab\n"], true), vec![l(Tag::Full, "ab")]);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(951_825_845, 7);
        assert_eq!(rfc3339_nano(t), "2000-02-29T12:04:05.000000007Z");
        let t = UNIX_EPOCH + Duration::new(1_735_689_599, 999_999_999);
        assert_eq!(rfc3339_nano(t), "2024-12-31T23:59:59.999999999Z");
        let t = UNIX_EPOCH + Duration::new(4_107_542_400, 0);
        assert_eq!(rfc3339_nano(t), "2100-03-01T00:00:00.000000000Z");
    }

    #[test]
    fn log_file_lines_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods/x/0.log");
        let mut log = CriLog::open(&path).unwrap();
        log.write_line(Stream::Stdout, Tag::Full, b"one").unwrap();
        std::fs::rename(&path, dir.path().join("old.log")).unwrap();
        log.write_line(Stream::Stderr, Tag::Partial, b"two")
            .unwrap();
        log.reopen().unwrap();
        log.write_line(Stream::Stderr, Tag::Full, b"three").unwrap();
        let old = std::fs::read_to_string(dir.path().join("old.log")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let old: Vec<&str> = old.lines().map(|l| &l[31..]).collect();
        assert_eq!(old, vec!["stdout F one", "stderr P two"]);
        assert!(new.ends_with("Z stderr F three\n"), "{new:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    }
}
