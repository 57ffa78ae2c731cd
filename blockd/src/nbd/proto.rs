//! NBD wire format: constants, request parsing and reply encoding.
//!
//! Pure code: bytes in, values out, values in, bytes out. Nothing here touches
//! a socket, a file or a runtime, so the fuzzer and the unit tests drive it
//! directly. The numbers are those of the NBD protocol (doc/proto.md of the
//! reference implementation); they are part of the wire format and must never
//! change.
//!
//! Layouts (all big-endian):
//! ```text
//! server greeting     "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16
//! client flags        u32
//! option              "IHAVEOPT" u64 | option u32 | length u32 | data
//! option reply        0x0003e889045565a9 u64 | option u32 | type u32 | length u32 | data
//! request (compact)   0x25609513 u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//! request (extended)  0x21e41c71 u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u64
//! simple reply        0x67446698 u32 | error u32 | cookie u64
//! structured chunk    0x668e33ef u32 | flags u16 | type u16 | cookie u64 | length u32
//! extended chunk      0x6e8a278c u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u64
//! ```

use std::fmt;

/// "NBDMAGIC": first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": greeting magic and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will omit the 124 zero bytes after EXPORT_NAME if the client agrees.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client asks for no zero padding.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation without entering transmission.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export.
pub const OPT_INFO: u32 = 6;
/// Ask about an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Enable 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// One information item in an INFO or GO reply.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown or unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option payload too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers already negotiated (reply to a later STRUCTURED_REPLY).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// TRIM supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// DF flag supported on READ.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Several connections share one consistent view; FLUSH on one covers all.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// FAST_ZERO supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ reply must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail fast if zeroing would be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// 32-bit block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// 64-bit block status descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error without offset.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a structured chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Size of an extended chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Largest option payload accepted; larger ones are drained and refused.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ or WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// NBD error values (errno numbers fixed by the protocol, not the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// I/O error.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left (write beyond the end).
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Not supported (FAST_ZERO that would be slow).
    NotSup = 95,
    /// Server shutting down.
    Shutdown = 108,
}

impl Errno {
    /// The wire value.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read.
    Read,
    /// Write with payload.
    Write,
    /// Soft disconnect.
    Disc,
    /// Make acknowledged writes durable.
    Flush,
    /// Discard.
    Trim,
    /// Prefetch.
    Cache,
    /// Write zeros without payload.
    WriteZeroes,
    /// Query metadata contexts.
    BlockStatus,
    /// A type this server does not know.
    Unknown(u16),
}

impl Command {
    fn from_wire(t: u16) -> Self {
        match t {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// Command flags valid for this command.
    fn allowed_flags(self) -> u16 {
        match self {
            Self::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Self::Write => CMD_FLAG_FUA,
            Self::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Self::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            Self::Trim | Self::Flush | Self::Cache => CMD_FLAG_FUA,
            Self::Disc | Self::Unknown(_) => 0,
        }
    }
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags as sent.
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// Opaque cookie echoed in every reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE, also the payload length).
    pub length: u64,
}

/// A request header that cannot be parsed: the connection cannot be kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Wrong magic: the stream is out of sync.
    #[error("bad request magic {magic:#010x}")]
    BadMagic {
        /// The magic received.
        magic: u32,
    },
    /// Too few bytes for a header.
    #[error("short request header ({len} bytes)")]
    Short {
        /// Bytes available.
        len: usize,
    },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Header length for the negotiated header style.
pub fn request_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    }
}

/// Parses a request header (compact or extended, as negotiated).
///
/// # Errors
/// [`FrameError`] when the magic is wrong or the buffer is short; the caller
/// must drop the connection because the stream cannot be resynchronised.
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, FrameError> {
    let need = request_len(extended);
    if b.len() < need {
        return Err(FrameError::Short { len: b.len() });
    }
    let magic = be_u32(b, 0);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(FrameError::BadMagic { magic });
    }
    let length = if extended {
        be_u64(b, 24)
    } else {
        u64::from(be_u32(b, 24))
    };
    Ok(Request {
        flags: be_u16(b, 4),
        command: Command::from_wire(be_u16(b, 6)),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        length,
    })
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    ///
    /// Only WRITE carries a payload (and, with extended headers, any command
    /// sent with PAYLOAD_LEN, which this server refuses after draining).
    pub fn payload_len(&self, extended: bool) -> u64 {
        match self.command {
            Command::Write => self.length,
            _ if extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0 => self.length,
            _ => 0,
        }
    }
}

/// What the connection knows when it checks a request.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Structured replies (or extended headers) negotiated.
    pub structured: bool,
    /// At least one metadata context selected.
    pub has_meta_context: bool,
    /// Extended headers negotiated (WRITE then carries PAYLOAD_LEN).
    pub extended: bool,
}

/// Checks a request against the export, returning the errno the spec
/// requires for a bad one. DISC is never passed here.
///
/// # Errors
/// The NBD error to send; the connection continues.
pub fn check_request(req: &Request, lim: &ExportLimits) -> Result<(), Errno> {
    if let Command::Unknown(_) = req.command {
        return Err(Errno::Inval);
    }
    let mut allowed = req.command.allowed_flags();
    if lim.extended && req.command == Command::Write {
        allowed |= CMD_FLAG_PAYLOAD_LEN;
    }
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    if req.flags & CMD_FLAG_DF != 0 && !lim.structured {
        return Err(Errno::Inval);
    }
    let end = req.offset.checked_add(req.length);
    let in_range = matches!(end, Some(e) if e <= lim.size);
    match req.command {
        Command::Read => {
            if req.length > u64::from(MAX_PAYLOAD) {
                return Err(Errno::Overflow);
            }
            if !in_range {
                return Err(Errno::Inval);
            }
        }
        Command::Write | Command::WriteZeroes => {
            if lim.read_only {
                return Err(Errno::Perm);
            }
            if req.command == Command::Write && req.length > u64::from(MAX_PAYLOAD) {
                return Err(Errno::Overflow);
            }
            if !in_range {
                return Err(Errno::NoSpc);
            }
        }
        Command::Trim => {
            if lim.read_only {
                return Err(Errno::Perm);
            }
            if !in_range {
                return Err(Errno::Inval);
            }
        }
        Command::Cache => {
            if !in_range {
                return Err(Errno::Inval);
            }
        }
        Command::BlockStatus => {
            if !lim.has_meta_context || req.length == 0 || !in_range {
                return Err(Errno::Inval);
            }
        }
        Command::Flush => {
            if req.offset != 0 || req.length != 0 {
                return Err(Errno::Inval);
            }
        }
        Command::Disc | Command::Unknown(_) => {}
    }
    Ok(())
}

/// How replies are framed on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Simple replies only.
    Simple,
    /// Structured replies (20-byte chunk headers).
    Structured,
    /// Extended headers (32-byte chunk headers).
    Extended,
}

impl ReplyStyle {
    /// Length of one chunk header.
    pub fn chunk_header_len(self) -> usize {
        match self {
            Self::Simple => 16,
            Self::Structured => STRUCTURED_HEADER_LEN,
            Self::Extended => EXTENDED_HEADER_LEN,
        }
    }
}

/// Appends a simple reply.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends one structured or extended chunk header. `offset` is only sent
/// with extended headers (where it is the request's offset).
pub fn chunk_header(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    match style {
        ReplyStyle::Simple | ReplyStyle::Structured => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            // Chunk payloads are bounded by MAX_PAYLOAD plus a few headers.
            out.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
        }
        ReplyStyle::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
}

/// Appends a complete reply for a command that succeeded without data
/// (WRITE, FLUSH, TRIM, ...).
pub fn ok_reply(out: &mut Vec<u8>, style: ReplyStyle, cookie: u64, offset: u64) {
    match style {
        ReplyStyle::Simple | ReplyStyle::Structured => simple_reply(out, cookie, 0),
        ReplyStyle::Extended => chunk_header(
            out,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            offset,
            0,
        ),
    }
}

/// Appends a complete error reply.
pub fn error_reply(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    errno: Errno,
    message: &str,
) {
    match style {
        ReplyStyle::Simple => simple_reply(out, cookie, errno.code()),
        ReplyStyle::Structured | ReplyStyle::Extended => {
            let msg = &message.as_bytes()[..message.len().min(4096)];
            let len = 6 + msg.len();
            chunk_header(
                out,
                style,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                offset,
                len as u64,
            );
            out.extend_from_slice(&errno.code().to_be_bytes());
            out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(msg);
        }
    }
}

/// One run of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Context-specific flags.
    pub flags: u32,
}

/// Appends one BLOCK_STATUS chunk for `context`. Descriptor lengths must fit
/// the style (the caller clamps to u32 for structured replies).
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    context: u32,
    extents: &[Extent],
    done: bool,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    if style == ReplyStyle::Extended {
        let len = 8 + 16 * extents.len() as u64;
        chunk_header(
            out,
            style,
            flags,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&u32::try_from(extents.len()).unwrap_or(0).to_be_bytes());
        for e in extents {
            out.extend_from_slice(&e.length.to_be_bytes());
            out.extend_from_slice(&u64::from(e.flags).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        chunk_header(
            out,
            style,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&context.to_be_bytes());
        for e in extents {
            out.extend_from_slice(&u32::try_from(e.length).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
    }
}

/// Bytes to reserve in front of read data so the reply needs no copy.
pub fn read_reply_header_len(style: ReplyStyle) -> usize {
    match style {
        ReplyStyle::Simple => 16,
        // Chunk header plus the 8-byte offset that starts an OFFSET_DATA payload.
        other => other.chunk_header_len() + 8,
    }
}

/// Turns data read into `buf[read_reply_header_len(style)..]` into a
/// complete READ reply. `holes` lists `(start, len)` ranges, relative to the
/// request offset, sorted and disjoint, that read as zeros; with structured
/// replies they become OFFSET_HOLE chunks unless `df` forbids fragmenting.
///
/// With no holes the reply is `buf` itself with its header filled in: the
/// data is never copied.
pub fn finish_read_reply(
    mut buf: Vec<u8>,
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    holes: &[(u64, u64)],
    df: bool,
) -> Vec<u8> {
    let hdr = read_reply_header_len(style);
    let data_len = (buf.len() - hdr) as u64;
    let mut h = Vec::with_capacity(hdr);
    if style == ReplyStyle::Simple {
        simple_reply(&mut h, cookie, 0);
        buf[..hdr].copy_from_slice(&h);
        return buf;
    }
    if holes.is_empty() || df {
        chunk_header(
            &mut h,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            offset,
            data_len + 8,
        );
        h.extend_from_slice(&offset.to_be_bytes());
        buf[..hdr].copy_from_slice(&h);
        return buf;
    }
    // Mixed data and holes: copy the data runs into their own chunks.
    let data = &buf[hdr..];
    let mut runs: Vec<(u64, u64, bool)> = Vec::with_capacity(holes.len() * 2 + 1);
    let mut pos = 0u64;
    for &(start, len) in holes.iter().filter(|h| h.1 > 0) {
        if start > pos {
            runs.push((pos, start - pos, false));
        }
        runs.push((start, len, true));
        pos = start + len;
    }
    if pos < data_len {
        runs.push((pos, data_len - pos, false));
    }
    let mut out = Vec::with_capacity(data.len() + (hdr + 12) * runs.len());
    let last = runs.len() - 1;
    for (i, (start, len, hole)) in runs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            chunk_header(
                &mut out,
                style,
                flags,
                REPLY_TYPE_OFFSET_HOLE,
                cookie,
                offset,
                12,
            );
            out.extend_from_slice(&(offset + start).to_be_bytes());
            out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        } else {
            chunk_header(
                &mut out,
                style,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                offset,
                len + 8,
            );
            out.extend_from_slice(&(offset + start).to_be_bytes());
            // Bounded by the request length, which was read into memory.
            let s = usize::try_from(start).unwrap_or(usize::MAX);
            let e = usize::try_from(start + len).unwrap_or(usize::MAX);
            out.extend_from_slice(&data[s..e]);
        }
    }
    out
}

/// Appends a complete OFFSET_HOLE-only reply (the whole range reads as zeros).
pub fn hole_reply(out: &mut Vec<u8>, style: ReplyStyle, cookie: u64, offset: u64, length: u64) {
    chunk_header(
        out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        offset,
        12,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read => f.write_str("READ"),
            Self::Write => f.write_str("WRITE"),
            Self::Disc => f.write_str("DISC"),
            Self::Flush => f.write_str("FLUSH"),
            Self::Trim => f.write_str("TRIM"),
            Self::Cache => f.write_str("CACHE"),
            Self::WriteZeroes => f.write_str("WRITE_ZEROES"),
            Self::BlockStatus => f.write_str("BLOCK_STATUS"),
            Self::Unknown(t) => write!(f, "UNKNOWN({t})"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_request(r: &Request, extended: bool) -> Vec<u8> {
        let mut b = Vec::new();
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&r.flags.to_be_bytes());
        let t: u16 = match r.command {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(t) => t,
        };
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(&r.cookie.to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        if extended {
            b.extend_from_slice(&r.length.to_be_bytes());
        } else {
            b.extend_from_slice(&(r.length as u32).to_be_bytes());
        }
        b
    }

    /// Decodes a structured READ reply back into the bytes it describes.
    fn decode_read_reply(reply: &[u8], style: ReplyStyle, offset: u64, len: usize) -> Vec<u8> {
        let hdr = style.chunk_header_len();
        let mut out = vec![0xffu8; len];
        let mut b = reply;
        let mut done = false;
        while !b.is_empty() {
            assert!(!done, "chunk after DONE");
            let flags = u16::from_be_bytes([b[4], b[5]]);
            let kind = u16::from_be_bytes([b[6], b[7]]);
            let clen = match style {
                ReplyStyle::Extended => u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize,
                _ => u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize,
            };
            let payload = &b[hdr..hdr + clen];
            let at = (u64::from_be_bytes(payload[..8].try_into().unwrap()) - offset) as usize;
            match kind {
                REPLY_TYPE_OFFSET_DATA => out[at..at + clen - 8].copy_from_slice(&payload[8..]),
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(clen, 12);
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    out[at..at + n].fill(0);
                }
                other => panic!("unexpected chunk type {other}"),
            }
            done = flags & REPLY_FLAG_DONE != 0;
            b = &b[hdr + clen..];
        }
        assert!(done, "no DONE chunk");
        out
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), ext: bool) {
            let _ = parse_request(&bytes, ext);
        }

        #[test]
        fn request_roundtrip(flags: u16, t in 0u16..12, cookie: u64, offset: u64, length: u32, ext: bool) {
            let r = Request { flags, command: Command::from_wire(t), cookie, offset, length: u64::from(length) };
            prop_assert_eq!(parse_request(&encode_request(&r, ext), ext).unwrap(), r);
        }

        #[test]
        fn check_request_never_panics(flags: u16, t in 0u16..12, offset: u64, length: u64, size: u64, ro: bool, st: bool, meta: bool, ext: bool) {
            let r = Request { flags, command: Command::from_wire(t), cookie: 1, offset, length };
            let lim = ExportLimits { size, read_only: ro, structured: st, has_meta_context: meta, extended: ext };
            if check_request(&r, &lim).is_ok() && matches!(r.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache | Command::BlockStatus) {
                prop_assert!(offset.checked_add(length).is_some_and(|e| e <= size));
            }
        }

        #[test]
        fn read_reply_describes_the_data(
            data in proptest::collection::vec(any::<u8>(), 1..20000),
            cuts in proptest::collection::vec(any::<u16>(), 0..8),
            ext: bool,
            df: bool,
        ) {
            let style = if ext { ReplyStyle::Extended } else { ReplyStyle::Structured };
            let len = data.len();
            // Build sorted disjoint holes from the cut points; zero them in the data.
            let mut points: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (len + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut want = data.clone();
            let mut holes = Vec::new();
            for pair in points.chunks(2) {
                if let [a, b] = *pair {
                    if b > a {
                        want[a..b].fill(0);
                        holes.push((a as u64, (b - a) as u64));
                    }
                }
            }
            let hdr = read_reply_header_len(style);
            let mut buf = vec![0u8; hdr];
            buf.extend_from_slice(&want);
            let reply = finish_read_reply(buf, style, 7, 1 << 30, &holes, df);
            prop_assert_eq!(decode_read_reply(&reply, style, 1 << 30, len), want);
        }
    }
}
