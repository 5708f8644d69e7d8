//! SPDY/3.1 framing (draft-mbelshe-httpbis-spdy-00 as amended by SPDY/3.1): control and data
//! frames to and from bytes, and the name/value header blocks inside SYN_STREAM, SYN_REPLY
//! and HEADERS, compressed with zlib primed by [`DICTIONARY`]. The compression context lives
//! as long as the connection, one per direction ([`HeaderEncoder`], [`HeaderDecoder`]).
//!
//! The parser takes any bytes: a frame it cannot make sense of is an error (the connection is
//! then closed), never a panic, and no length it reads makes it allocate more than
//! [`MAX_FRAME`] or [`MAX_HEADER_BLOCK`].

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::DICTIONARY;

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// FLAG_FIN: the sender's last frame on this stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL of SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// A frame's length field has 24 bits.
pub const MAX_FRAME: usize = (1 << 24) - 1;
/// The largest header block berth decompresses (the peer's headers are a handful of names).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// RST_STREAM status codes used by berth.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_INVALID_STREAM: u32 = 2;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// Why bytes are not SPDY/3.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("{what} frame of {len} bytes is malformed")]
    Malformed { what: &'static str, len: usize },
    #[error("header block: {0}")]
    Headers(String),
    #[error("header compression: {0}")]
    Compression(String),
}

/// Name/value pairs of a header block; names are lower case.
pub type Headers = Vec<(String, String)>;

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// (flags, id, value)
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    /// A control frame of a type this draft does not define: receivers ignore it.
    Unknown {
        frame_type: u16,
    },
}

/// Compresses header blocks (the sending direction's zlib stream).
pub struct HeaderEncoder {
    z: Compress,
}

impl HeaderEncoder {
    pub fn new() -> Result<HeaderEncoder, SpdyError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&DICTIONARY)
            .map_err(|e| SpdyError::Compression(e.to_string()))?;
        Ok(HeaderEncoder { z })
    }

    /// The compressed form of `headers`, ending at a sync flush point.
    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let raw = encode_block(headers)?;
        let mut out = Vec::with_capacity(raw.len() / 2 + 64);
        let mut consumed = 0usize;
        loop {
            let before = self.z.total_in();
            self.z
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            consumed += (self.z.total_in() - before) as usize;
            // Done once all input is in and the flush left room to spare.
            if consumed >= raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(256);
        }
    }
}

/// Decompresses header blocks (the receiving direction's zlib stream).
pub struct HeaderDecoder {
    z: Decompress,
}

impl HeaderDecoder {
    pub fn new() -> HeaderDecoder {
        HeaderDecoder {
            z: Decompress::new(true),
        }
    }

    fn decompress(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let err = |e: String| SpdyError::Compression(e);
        let mut out = Vec::with_capacity((block.len() * 4).clamp(64, MAX_HEADER_BLOCK));
        let mut consumed = 0usize;
        loop {
            let (in_before, out_before) = (self.z.total_in(), out.len());
            let result = self
                .z
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.z.total_in() - in_before) as usize;
            match result {
                Ok(Status::StreamEnd) => {
                    return Err(err("the peer ended its header stream".to_string()));
                }
                Ok(Status::Ok) | Ok(Status::BufError) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| err(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(err(e.to_string())),
            }
            if consumed >= block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::Headers(format!(
                        "more than {MAX_HEADER_BLOCK} bytes"
                    )));
                }
                out.reserve(out.len().min(MAX_HEADER_BLOCK - out.len()).max(64));
            } else if self.z.total_in() == in_before && out.len() == out_before {
                // No progress with room to spare: the input is cut short.
                return Err(err("truncated header block".to_string()));
            }
        }
    }
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        HeaderDecoder::new()
    }
}

/// A header block before compression: count, then length-prefixed names and values.
fn encode_block(headers: &Headers) -> Result<Vec<u8>, SpdyError> {
    let too_long = || SpdyError::Headers("a header is longer than 4 GiB".to_string());
    let mut raw = Vec::new();
    let n = u32::try_from(headers.len()).map_err(|_| too_long())?;
    raw.extend_from_slice(&n.to_be_bytes());
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        for s in [name.as_bytes(), value.as_bytes()] {
            let len = u32::try_from(s.len()).map_err(|_| too_long())?;
            raw.extend_from_slice(&len.to_be_bytes());
            raw.extend_from_slice(s);
        }
    }
    Ok(raw)
}

/// Parses a decompressed header block. A value holding NULs is several values; each becomes
/// a pair of its own.
fn decode_block(raw: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |why: &str| SpdyError::Headers(why.to_string());
    let mut r = Reader { buf: raw, at: 0 };
    let n = r.u32().ok_or_else(|| bad("no count"))? as usize;
    // Each pair takes at least 8 bytes: a count beyond that is a lie.
    if n > raw.len() / 8 {
        return Err(bad("more pairs than bytes"));
    }
    let mut headers = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.string().ok_or_else(|| bad("truncated name"))?;
        let value = r.string().ok_or_else(|| bad("truncated value"))?;
        if name.is_empty() {
            return Err(bad("empty header name"));
        }
        for v in value.split('\0') {
            headers.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }
    Ok(headers)
}

/// The first value of header `name` (lower case).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).ok()
    }
    fn rest(&self) -> &[u8] {
        &self.buf[self.at.min(self.buf.len())..]
    }
}

/// Parses the first frame in `buf`. `Ok(None)`: more bytes are needed; otherwise the frame
/// and how many bytes it took.
pub fn decode(
    buf: &[u8],
    headers: &mut HeaderDecoder,
) -> Result<Option<(Frame, usize)>, SpdyError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
    let flags = buf[4];
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let body = &buf[8..8 + len];
    let word = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if word & 0x8000_0000 == 0 {
        let frame = Frame::Data {
            stream_id: word & 0x7fff_ffff,
            flags,
            data: body.to_vec(),
        };
        return Ok(Some((frame, 8 + len)));
    }
    let version = ((word >> 16) & 0x7fff) as u16;
    if version != VERSION {
        return Err(SpdyError::Version(version));
    }
    let frame_type = (word & 0xffff) as u16;
    let frame = decode_control(frame_type, flags, body, headers)?;
    Ok(Some((frame, 8 + len)))
}

fn decode_control(
    frame_type: u16,
    flags: u8,
    body: &[u8],
    headers: &mut HeaderDecoder,
) -> Result<Frame, SpdyError> {
    let mut r = Reader { buf: body, at: 0 };
    let malformed = |what| SpdyError::Malformed {
        what,
        len: body.len(),
    };
    let exact = |want: usize, what| {
        if body.len() == want {
            Ok(())
        } else {
            Err(malformed(what))
        }
    };
    let frame = match frame_type {
        TYPE_SYN_STREAM => {
            let stream_id = r.u32().ok_or(malformed("SYN_STREAM"))? & 0x7fff_ffff;
            let associated_to = r.u32().ok_or(malformed("SYN_STREAM"))? & 0x7fff_ffff;
            let priority = r.u8().ok_or(malformed("SYN_STREAM"))? >> 5;
            let _slot = r.u8().ok_or(malformed("SYN_STREAM"))?;
            if stream_id == 0 {
                return Err(malformed("SYN_STREAM"));
            }
            let headers = decode_block(&headers.decompress(r.rest())?)?;
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            }
        }
        TYPE_SYN_REPLY | TYPE_HEADERS => {
            let what = if frame_type == TYPE_SYN_REPLY {
                "SYN_REPLY"
            } else {
                "HEADERS"
            };
            let stream_id = r.u32().ok_or(malformed(what))? & 0x7fff_ffff;
            let block = decode_block(&headers.decompress(r.rest())?)?;
            if frame_type == TYPE_SYN_REPLY {
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers: block,
                }
            } else {
                Frame::Headers {
                    stream_id,
                    flags,
                    headers: block,
                }
            }
        }
        TYPE_RST_STREAM => {
            exact(8, "RST_STREAM")?;
            Frame::RstStream {
                stream_id: r.u32().ok_or(malformed("RST_STREAM"))? & 0x7fff_ffff,
                status: r.u32().ok_or(malformed("RST_STREAM"))?,
            }
        }
        TYPE_SETTINGS => {
            let n = r.u32().ok_or(malformed("SETTINGS"))? as usize;
            if n.checked_mul(8).and_then(|b| b.checked_add(4)) != Some(body.len()) {
                return Err(malformed("SETTINGS"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let fid = r.u32().ok_or(malformed("SETTINGS"))?;
                let value = r.u32().ok_or(malformed("SETTINGS"))?;
                entries.push(((fid >> 24) as u8, fid & 0x00ff_ffff, value));
            }
            Frame::Settings { flags, entries }
        }
        TYPE_PING => {
            exact(4, "PING")?;
            Frame::Ping {
                id: r.u32().ok_or(malformed("PING"))?,
            }
        }
        TYPE_GOAWAY => {
            exact(8, "GOAWAY")?;
            Frame::GoAway {
                last_good_stream_id: r.u32().ok_or(malformed("GOAWAY"))? & 0x7fff_ffff,
                status: r.u32().ok_or(malformed("GOAWAY"))?,
            }
        }
        TYPE_WINDOW_UPDATE => {
            exact(8, "WINDOW_UPDATE")?;
            Frame::WindowUpdate {
                stream_id: r.u32().ok_or(malformed("WINDOW_UPDATE"))? & 0x7fff_ffff,
                delta: r.u32().ok_or(malformed("WINDOW_UPDATE"))? & 0x7fff_ffff,
            }
        }
        other => Frame::Unknown { frame_type: other },
    };
    Ok(frame)
}

fn control_header(out: &mut Vec<u8>, frame_type: u16, flags: u8, len: usize) {
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
}

/// Appends `frame` to `out`.
pub fn encode(
    frame: &Frame,
    headers: &mut HeaderEncoder,
    out: &mut Vec<u8>,
) -> Result<(), SpdyError> {
    let too_big = |what| SpdyError::Malformed {
        what,
        len: MAX_FRAME + 1,
    };
    match frame {
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            if data.len() > MAX_FRAME {
                return Err(too_big("DATA"));
            }
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.push(*flags);
            out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(data);
        }
        Frame::SynStream {
            stream_id,
            associated_to,
            priority,
            flags,
            headers: h,
        } => {
            let block = headers.compress(h)?;
            if block.len() + 10 > MAX_FRAME {
                return Err(too_big("SYN_STREAM"));
            }
            control_header(out, TYPE_SYN_STREAM, *flags, block.len() + 10);
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&(associated_to & 0x7fff_ffff).to_be_bytes());
            out.push((priority & 0x7) << 5);
            out.push(0);
            out.extend_from_slice(&block);
        }
        Frame::SynReply {
            stream_id,
            flags,
            headers: h,
        }
        | Frame::Headers {
            stream_id,
            flags,
            headers: h,
        } => {
            let t = if matches!(frame, Frame::SynReply { .. }) {
                TYPE_SYN_REPLY
            } else {
                TYPE_HEADERS
            };
            let block = headers.compress(h)?;
            if block.len() + 4 > MAX_FRAME {
                return Err(too_big("SYN_REPLY"));
            }
            control_header(out, t, *flags, block.len() + 4);
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&block);
        }
        Frame::RstStream { stream_id, status } => {
            control_header(out, TYPE_RST_STREAM, 0, 8);
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
        Frame::Settings { flags, entries } => {
            control_header(out, TYPE_SETTINGS, *flags, 4 + entries.len() * 8);
            out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            for (f, id, value) in entries {
                out.extend_from_slice(&((u32::from(*f) << 24) | (id & 0x00ff_ffff)).to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
        Frame::Ping { id } => {
            control_header(out, TYPE_PING, 0, 4);
            out.extend_from_slice(&id.to_be_bytes());
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            control_header(out, TYPE_GOAWAY, 0, 8);
            out.extend_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&status.to_be_bytes());
        }
        Frame::WindowUpdate { stream_id, delta } => {
            control_header(out, TYPE_WINDOW_UPDATE, 0, 8);
            out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
            out.extend_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
        }
        Frame::Unknown { frame_type } => control_header(out, *frame_type, 0, 0),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
