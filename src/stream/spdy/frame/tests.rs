//! Frames built byte by byte from the SPDY/3.1 draft's layouts, parsed and re-encoded; header
//! blocks through the connection-long zlib context; and garbage, which must give errors or
//! "need more", never a panic.

use super::*;

fn parse_one(bytes: &[u8]) -> Result<Option<(Frame, usize)>, SpdyError> {
    decode(bytes, &mut HeaderDecoder::new())
}

fn roundtrip(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut HeaderEncoder::new().expect("encoder"), &mut out).expect("encode");
    out
}

/// A raw (uncompressed) header block as section 2.6.10 lays it out.
fn raw_block(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = (pairs.len() as u32).to_be_bytes().to_vec();
    for (n, v) in pairs {
        b.extend_from_slice(&(n.len() as u32).to_be_bytes());
        b.extend_from_slice(n.as_bytes());
        b.extend_from_slice(&(v.len() as u32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// zlib with the SPDY dictionary and a sync flush, as a peer compresses header blocks.
fn peer_compress(z: &mut Compress, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 1024);
    z.compress_vec(raw, &mut out, FlushCompress::Sync)
        .expect("compress");
    out
}

fn peer_compressor() -> Compress {
    let mut z = Compress::new(Compression::best(), true);
    z.set_dictionary(&DICTIONARY).expect("dictionary");
    z
}

#[test]
fn dictionary_is_the_drafts() {
    assert_eq!(DICTIONARY.len(), 1423);
    assert_eq!(&DICTIONARY[..11], b"\0\0\0\x07options");
    assert!(DICTIONARY.ends_with(b"enq=0."));
}

#[test]
fn ping_from_draft_layout() {
    // +----------------------------------+
    // |1|   version    |         6       |
    // | 0 (flags) |     4 (length)       |
    // |            32-bit ID             |
    let bytes = [
        0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x07,
    ];
    let (f, used) = parse_one(&bytes).expect("parse").expect("whole");
    assert_eq!(used, 12);
    assert_eq!(f, Frame::Ping { id: 7 });
    assert_eq!(roundtrip(&f), bytes);
}

#[test]
fn data_frame_from_draft_layout() {
    // |0|       Stream-ID (31bits)       |
    // | Flags (8)  |  Length (24 bits)   |
    let mut bytes = vec![0x00, 0x00, 0x00, 0x05, 0x01, 0x00, 0x00, 0x03];
    bytes.extend_from_slice(b"abc");
    let (f, used) = parse_one(&bytes).expect("parse").expect("whole");
    assert_eq!(used, 11);
    assert_eq!(
        f,
        Frame::Data {
            stream_id: 5,
            flags: FLAG_FIN,
            data: b"abc".to_vec()
        }
    );
    assert_eq!(roundtrip(&f), bytes);
}

#[test]
fn fixed_size_control_frames() {
    let cases: Vec<(Vec<u8>, Frame)> = vec![
        (
            vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 5],
            Frame::RstStream {
                stream_id: 1,
                status: RST_CANCEL,
            },
        ),
        (
            vec![0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 9, 0, 0, 0, 0],
            Frame::GoAway {
                last_good_stream_id: 9,
                status: 0,
            },
        ),
        (
            vec![0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 3, 0, 1, 0, 0],
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 65536,
            },
        ),
        (
            // SETTINGS: 1 entry, flags 0, id 7 (INITIAL_WINDOW_SIZE), value 65536.
            vec![
                0x80, 3, 0, 4, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 7, 0, 1, 0, 0,
            ],
            Frame::Settings {
                flags: 0,
                entries: vec![(0, 7, 65536)],
            },
        ),
    ];
    for (bytes, want) in cases {
        let (f, used) = parse_one(&bytes).expect("parse").expect("whole");
        assert_eq!(used, bytes.len());
        assert_eq!(f, want);
        assert_eq!(roundtrip(&f), bytes);
    }
}

#[test]
fn syn_stream_from_draft_layout_with_compressed_headers() {
    let mut peer = peer_compressor();
    let block = peer_compress(
        &mut peer,
        &raw_block(&[("streamtype", "error"), ("x-multi", "a\0b")]),
    );
    // zlib header with FDICT set (RFC 1950): the dictionary is required.
    assert_eq!(block[0] & 0x0f, 8);
    assert_ne!(block[1] & 0x20, 0);
    let mut bytes = vec![0x80, 0x03, 0x00, 0x01, FLAG_UNIDIRECTIONAL];
    bytes.extend_from_slice(&((block.len() + 10) as u32).to_be_bytes()[1..]);
    bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0]);
    bytes.extend_from_slice(&block);

    // A second SYN_STREAM continues the same zlib stream (no new zlib header).
    let block2 = peer_compress(&mut peer, &raw_block(&[("streamtype", "stdout")]));
    let mut bytes2 = vec![0x80, 0x03, 0x00, 0x01, 0];
    bytes2.extend_from_slice(&((block2.len() + 10) as u32).to_be_bytes()[1..]);
    bytes2.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0, 0, 0]);
    bytes2.extend_from_slice(&block2);

    let mut all = bytes.clone();
    all.extend_from_slice(&bytes2);
    let mut dec = HeaderDecoder::new();
    let (f, used) = decode(&all, &mut dec).expect("parse").expect("whole");
    assert_eq!(used, bytes.len());
    assert_eq!(
        f,
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            flags: FLAG_UNIDIRECTIONAL,
            headers: vec![
                ("streamtype".into(), "error".into()),
                ("x-multi".into(), "a".into()),
                ("x-multi".into(), "b".into()),
            ],
        }
    );
    let (f2, used2) = decode(&all[used..], &mut dec)
        .expect("parse")
        .expect("whole");
    assert_eq!(used2, bytes2.len());
    let Frame::SynStream {
        stream_id, headers, ..
    } = f2
    else {
        panic!("not a SYN_STREAM: {f2:?}");
    };
    assert_eq!(stream_id, 3);
    assert_eq!(header(&headers, "streamType"), Some("stdout"));
}

#[test]
fn our_header_blocks_decode_with_a_peer_inflater() {
    let mut enc = HeaderEncoder::new().expect("encoder");
    let mut peer = Decompress::new(true);
    for i in 0..3u32 {
        let f = Frame::SynReply {
            stream_id: 2 * i + 1,
            flags: 0,
            headers: vec![("X-Stream-Protocol-Version".into(), format!("v{i}"))],
        };
        let mut out = Vec::new();
        encode(&f, &mut enc, &mut out).expect("encode");
        assert_eq!(&out[..4], &[0x80, 3, 0, 2]);
        let len = u32::from_be_bytes([0, out[5], out[6], out[7]]) as usize;
        assert_eq!(out.len(), 8 + len);
        assert_eq!(&out[8..12], &(2 * i + 1).to_be_bytes());
        let block = &out[12..];
        let mut raw = Vec::with_capacity(4096);
        let mut used = 0;
        loop {
            let before = peer.total_in();
            match peer.decompress_vec(&block[used..], &mut raw, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    peer.set_dictionary(&DICTIONARY).expect("dict");
                }
                Err(e) => panic!("inflate: {e}"),
            }
            used += (peer.total_in() - before) as usize;
            if used == block.len() {
                break;
            }
        }
        // Names go out in lower case, as SPDY/3 requires.
        assert_eq!(
            raw,
            raw_block(&[("x-stream-protocol-version", &format!("v{i}"))])
        );
    }
}

#[test]
fn partial_input_needs_more() {
    let bytes = roundtrip(&Frame::Ping { id: 1 });
    for cut in 0..bytes.len() {
        assert_eq!(parse_one(&bytes[..cut]), Ok(None));
    }
    // A huge length is just "more bytes needed" (at most 16 MiB can be announced).
    assert_eq!(
        parse_one(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 1, 2, 3]),
        Ok(None)
    );
}

#[test]
fn malformed_frames_are_errors() {
    // Wrong version.
    assert_eq!(
        parse_one(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
        Err(SpdyError::Version(2))
    );
    // PING with 3 bytes.
    assert!(parse_one(&[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1]).is_err());
    // SYN_STREAM too short for its fixed part.
    assert!(parse_one(&[0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
    // SYN_STREAM with stream id 0.
    assert!(parse_one(&[0x80, 3, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    // SETTINGS whose count does not match its length.
    assert!(parse_one(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).is_err());
    // A header block that is not zlib.
    let mut bad = vec![0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(b"junk");
    assert!(parse_one(&bad).is_err());
}

#[test]
fn lying_header_counts_are_errors() {
    let mut peer = peer_compressor();
    let mut raw = raw_block(&[("a", "b")]);
    raw[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    let block = peer_compress(&mut peer, &raw);
    let mut bytes = vec![0x80, 3, 0, 1, 0];
    bytes.extend_from_slice(&((block.len() + 10) as u32).to_be_bytes()[1..]);
    bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    bytes.extend_from_slice(&block);
    assert!(matches!(parse_one(&bytes), Err(SpdyError::Headers(_))));
}

#[test]
fn header_bombs_are_refused() {
    // 4 MiB of one repeated byte compresses to a few KiB; decompressing stops at the cap.
    let mut peer = peer_compressor();
    let big = "x".repeat(4 << 20);
    let block = peer_compress(&mut peer, &raw_block(&[("a", &big)]));
    let mut bytes = vec![0x80, 3, 0, 1, 0];
    bytes.extend_from_slice(&((block.len() + 10) as u32).to_be_bytes()[1..]);
    bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    bytes.extend_from_slice(&block);
    assert!(matches!(parse_one(&bytes), Err(SpdyError::Headers(_))));
}

#[test]
fn garbage_never_panics() {
    // A small deterministic generator (xorshift) instead of a fuzzer dependency.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for round in 0..20_000 {
        let len = (next() % 64) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the inputs look like SPDY/3 control frames of known types with fitting lengths.
        if round % 2 == 0 && buf.len() >= 8 {
            buf[0] = 0x80;
            buf[1] = 3;
            buf[2] = 0;
            buf[3] = (next() % 10) as u8;
            let body = (buf.len() - 8) as u32;
            buf[5..8].copy_from_slice(&body.to_be_bytes()[1..]);
        }
        let mut dec = HeaderDecoder::new();
        let mut at = 0;
        while at < buf.len() {
            match decode(&buf[at..], &mut dec) {
                Ok(Some((_, used))) => {
                    assert!(used >= 8);
                    at += used;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}
