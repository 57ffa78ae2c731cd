//! The kernel's generic-netlink family "nbd" (include/uapi/linux/
//! nbd-netlink.h): the messages, built and parsed with the rust-netlink
//! crates, and a small synchronous request/reply socket.
//!
//! Building and parsing are pure functions, unit-tested against the uapi
//! constants; only [`Genl`] touches the kernel.

use std::os::fd::RawFd;

use netlink_packet_core::{
    emit_u32, emit_u64, parse_string, parse_u32, parse_u8, DecodeError, DefaultNla, Emitable,
    ErrorContext, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

/// Family name the nbd module registers.
pub const FAMILY: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const VERSION: u8 = 1;

/// `enum nbd_commands`.
pub const CMD_CONNECT: u8 = 1;
/// Tear a device down.
pub const CMD_DISCONNECT: u8 = 2;
/// Give a configured device new sockets.
pub const CMD_RECONFIGURE: u8 = 3;
/// Devices and whether they are connected.
pub const CMD_STATUS: u8 = 5;

/// `enum nbd_attrs`.
pub const ATTR_INDEX: u16 = 1;
/// u64 bytes.
pub const ATTR_SIZE_BYTES: u16 = 2;
/// u64 bytes.
pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// u64 seconds.
pub const ATTR_TIMEOUT: u16 = 4;
/// u64: the NBD transmission flags.
pub const ATTR_SERVER_FLAGS: u16 = 5;
/// u64: `NBD_CFLAG_*`.
pub const ATTR_CLIENT_FLAGS: u16 = 6;
/// Nested `NBD_SOCK_ITEM`s.
pub const ATTR_SOCKETS: u16 = 7;
/// u64 seconds.
pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// Nested `NBD_DEVICE_ITEM`s.
pub const ATTR_DEVICE_LIST: u16 = 9;
/// String naming the server (shown in /sys/block/nbdN/backend).
pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
/// `NBD_SOCK_ITEM`.
pub const SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD`, u32.
pub const SOCK_FD: u16 = 1;
/// `NBD_DEVICE_ITEM`.
pub const DEVICE_ITEM: u16 = 1;
/// `NBD_DEVICE_INDEX`, u32.
pub const DEVICE_INDEX: u16 = 1;
/// `NBD_DEVICE_CONNECTED`, u8.
pub const DEVICE_CONNECTED: u16 = 2;
/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;

/// One attribute of the family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// Device index (N of /dev/nbdN).
    Index(u32),
    /// Export size.
    SizeBytes(u64),
    /// Logical block size.
    BlockSizeBytes(u64),
    /// Request timeout, seconds.
    Timeout(u64),
    /// Transmission flags of the export.
    ServerFlags(u64),
    /// Client flags.
    ClientFlags(u64),
    /// Connected socket descriptors (of the sending process).
    Sockets(Vec<u32>),
    /// How long a device waits for new sockets after losing them.
    DeadConnTimeout(u64),
    /// `(index, connected)` of each device (STATUS replies).
    DeviceList(Vec<(u32, bool)>),
    /// Who serves the device.
    BackendIdentifier(String),
    /// Anything else.
    Other(DefaultNla),
}

/// A nested list of `(kind, u32)` items wrapped in `item` attributes.
struct Items<'a> {
    item: u16,
    inner: &'a [(u16, u32)],
}

impl Nla for Items<'_> {
    fn value_len(&self) -> usize {
        self.inner.len() * 8
    }
    fn kind(&self) -> u16 {
        self.item
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        for (i, (kind, v)) in self.inner.iter().enumerate() {
            let b = &mut buffer[i * 8..i * 8 + 8];
            b[..2].copy_from_slice(&8u16.to_ne_bytes());
            b[2..4].copy_from_slice(&kind.to_ne_bytes());
            emit_u32(&mut b[4..8], *v).expect("4 bytes");
        }
    }
    fn is_nested(&self) -> bool {
        true
    }
}

impl Attr {
    fn sock_items(fds: &[u32]) -> Vec<[(u16, u32); 1]> {
        fds.iter().map(|fd| [(SOCK_FD, *fd)]).collect()
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Self::Index(_) => 4,
            Self::SizeBytes(_)
            | Self::BlockSizeBytes(_)
            | Self::Timeout(_)
            | Self::ServerFlags(_)
            | Self::ClientFlags(_)
            | Self::DeadConnTimeout(_) => 8,
            // Each: an item header (4) around one u32 attribute (8).
            Self::Sockets(fds) => fds.len() * 12,
            Self::DeviceList(d) => d.len() * (4 + 8 + 8),
            Self::BackendIdentifier(s) => s.len() + 1,
            Self::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Self::Index(_) => ATTR_INDEX,
            Self::SizeBytes(_) => ATTR_SIZE_BYTES,
            Self::BlockSizeBytes(_) => ATTR_BLOCK_SIZE_BYTES,
            Self::Timeout(_) => ATTR_TIMEOUT,
            Self::ServerFlags(_) => ATTR_SERVER_FLAGS,
            Self::ClientFlags(_) => ATTR_CLIENT_FLAGS,
            Self::Sockets(_) => ATTR_SOCKETS,
            Self::DeadConnTimeout(_) => ATTR_DEAD_CONN_TIMEOUT,
            Self::DeviceList(_) => ATTR_DEVICE_LIST,
            Self::BackendIdentifier(_) => ATTR_BACKEND_IDENTIFIER,
            Self::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Index(v) => emit_u32(buffer, *v).expect("4 bytes"),
            Self::SizeBytes(v)
            | Self::BlockSizeBytes(v)
            | Self::Timeout(v)
            | Self::ServerFlags(v)
            | Self::ClientFlags(v)
            | Self::DeadConnTimeout(v) => emit_u64(buffer, *v).expect("8 bytes"),
            Self::Sockets(fds) => {
                let items = Self::sock_items(fds);
                let nlas: Vec<Items<'_>> = items
                    .iter()
                    .map(|i| Items {
                        item: SOCK_ITEM,
                        inner: i,
                    })
                    .collect();
                nlas.as_slice().emit(buffer);
            }
            Self::DeviceList(devices) => {
                let items: Vec<[(u16, u32); 2]> = devices
                    .iter()
                    .map(|(i, c)| [(DEVICE_INDEX, *i), (DEVICE_CONNECTED, u32::from(*c))])
                    .collect();
                let nlas: Vec<Items<'_>> = items
                    .iter()
                    .map(|i| Items {
                        item: DEVICE_ITEM,
                        inner: i,
                    })
                    .collect();
                nlas.as_slice().emit(buffer);
            }
            Self::BackendIdentifier(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            Self::Other(n) => n.emit_value(buffer),
        }
    }
    fn is_nested(&self) -> bool {
        matches!(self, Self::Sockets(_) | Self::DeviceList(_))
    }
}

fn nested(value: &[u8]) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, DecodeError>> {
    NlasIterator::new(value)
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for Attr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            ATTR_INDEX => Self::Index(parse_u32(v).context("NBD_ATTR_INDEX")?),
            ATTR_DEVICE_LIST => {
                let mut devices = Vec::new();
                for item in nested(v) {
                    let item = item?;
                    let (mut index, mut connected) = (None, false);
                    for a in nested(item.value()) {
                        let a = a?;
                        match a.kind() {
                            DEVICE_INDEX => index = Some(parse_u32(a.value())?),
                            // The kernel sends a u8.
                            DEVICE_CONNECTED if a.value().len() == 1 => {
                                connected = parse_u8(a.value())? != 0;
                            }
                            DEVICE_CONNECTED => connected = parse_u32(a.value())? != 0,
                            _ => {}
                        }
                    }
                    if let Some(i) = index {
                        devices.push((i, connected));
                    }
                }
                Self::DeviceList(devices)
            }
            ATTR_BACKEND_IDENTIFIER => Self::BackendIdentifier(parse_string(v)?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A message of the nbd family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nbd {
    /// `NBD_CMD_*`.
    pub cmd: u8,
    /// Attributes.
    pub attrs: Vec<Attr>,
}

impl GenlFamily for Nbd {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for Nbd {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Nbd {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|n| n.and_then(|n| Attr::parse(&n)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// What NBD_CMD_CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// A given /dev/nbdN, or the first free one.
    pub index: Option<u32>,
    /// Export size.
    pub size: u64,
    /// Logical block size (512 .. 4096, a power of two).
    pub block_size: u64,
    /// Seconds before a request is timed out.
    pub timeout: u64,
    /// Seconds the device waits for new sockets after losing them.
    pub dead_conn_timeout: u64,
    /// Transmission flags of the export.
    pub server_flags: u64,
    /// Shown in /sys/block/nbdN/backend.
    pub backend: String,
}

/// Serializes a request of the family with id `family`.
pub fn request(family: u16, seq: u32, msg: Nbd) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family);
    genl.finalize();
    let mut nl = NetlinkMessage::from(genl);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut out = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut out);
    out
}

/// NBD_CMD_CONNECT (or RECONFIGURE with `reconfigure`) with sockets `fds`.
pub fn connect(c: &Connect, fds: &[RawFd], reconfigure: bool) -> Nbd {
    let mut attrs = Vec::new();
    if let Some(i) = c.index {
        attrs.push(Attr::Index(i));
    }
    if !reconfigure {
        attrs.extend([
            Attr::SizeBytes(c.size),
            Attr::BlockSizeBytes(c.block_size),
            Attr::ServerFlags(c.server_flags),
            // The device goes away when blockd detaches it.
            Attr::ClientFlags(CFLAG_DESTROY_ON_DISCONNECT),
        ]);
    }
    // A device connected with a backend identifier is reconfigured only
    // by a request naming the same one (the kernel answers EINVAL,
    // "backend image doesn't match", otherwise).
    attrs.push(Attr::BackendIdentifier(c.backend.clone()));
    attrs.extend([
        Attr::Timeout(c.timeout),
        Attr::DeadConnTimeout(c.dead_conn_timeout),
        Attr::Sockets(
            fds.iter()
                .map(|&f| u32::try_from(f).unwrap_or(u32::MAX))
                .collect(),
        ),
    ]);
    Nbd {
        cmd: if reconfigure {
            CMD_RECONFIGURE
        } else {
            CMD_CONNECT
        },
        attrs,
    }
}

/// The family-id lookup: CTRL_CMD_GETFAMILY for "nbd".
pub fn family_request(seq: u32) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_owned())],
    });
    genl.finalize();
    let mut nl = NetlinkMessage::from(genl);
    // The ACK ends the exchange ([`Genl::exchange`] reads up to it): the
    // kernel sends the family's message and then, asked, an ACK.
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut out = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut out);
    out
}

/// What the kernel answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    /// A message of the family.
    Message(T),
    /// An acknowledgement (error code 0).
    Ack,
    /// An error, as a positive errno.
    Error(i32),
}

/// Parses every reply in `buf` (one datagram).
///
/// # Errors
/// Bytes that are not netlink messages of type `T`.
pub fn parse_replies<T>(buf: &[u8]) -> Result<Vec<Reply<T>>, DecodeError>
where
    T: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let msg = NetlinkMessage::<T>::deserialize(&buf[at..])
            .map_err(|e| DecodeError::from(e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(m) => out.push(Reply::Message(m)),
            NetlinkPayload::Error(e) => match e.code {
                None => out.push(Reply::Ack),
                Some(c) => out.push(Reply::Error(-c.get())),
            },
            _ => {}
        }
        if len == 0 {
            break;
        }
        at += (len + 3) & !3;
    }
    Ok(out)
}

/// The family id in a GETFAMILY reply.
pub fn family_id(replies: &[Reply<GenlMessage<GenlCtrl>>]) -> Option<u16> {
    replies.iter().find_map(|r| match r {
        Reply::Message(m) => m.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        }),
        _ => None,
    })
}

/// How long an exchange waits for each datagram of the kernel's answer.
/// NBD_CMD_CONNECT returns once the device is set up (the partition scan
/// runs later, when the device is first opened), so seconds are plenty.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether device `index` is connected, from the device lists of STATUS
/// replies; `None` when no reply lists it.
pub fn connected(replies: &[Reply<GenlMessage<Nbd>>], index: u32) -> Option<bool> {
    replies.iter().find_map(|r| match r {
        Reply::Message(m) => m.payload.attrs.iter().find_map(|a| match a {
            Attr::DeviceList(d) => d.iter().find(|(i, _)| *i == index).map(|(_, c)| *c),
            _ => None,
        }),
        _ => None,
    })
}

/// A generic-netlink socket for request/reply exchanges.
pub struct Genl {
    socket: netlink_sys::Socket,
    seq: u32,
}

impl Genl {
    /// Opens and binds the socket.
    ///
    /// # Errors
    /// The kernel refused the socket.
    pub fn open() -> std::io::Result<Self> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // A reply that never comes must not hold an API request forever.
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(REPLY_TIMEOUT),
        )?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and returns the replies of its datagram(s) up
    /// to the acknowledgement or error.
    ///
    /// # Errors
    /// Socket errors; replies that do not parse.
    pub fn exchange<T>(
        &mut self,
        build: impl FnOnce(u32) -> Vec<u8>,
    ) -> std::io::Result<Vec<Reply<T>>>
    where
        T: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let req = build(self.seq);
        self.socket.send(&req, 0)?;
        let mut all = Vec::new();
        loop {
            let mut buf = vec![0u8; 16 << 10];
            let n = self.socket.recv(&mut &mut buf[..], 0).map_err(|e| {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the kernel's nbd driver did not answer within {}s",
                            REPLY_TIMEOUT.as_secs()
                        ),
                    )
                } else {
                    e
                }
            })?;
            let replies = parse_replies::<T>(&buf[..n])
                .map_err(|e| std::io::Error::other(format!("netlink reply: {e}")))?;
            let done = replies
                .iter()
                .any(|r| matches!(r, Reply::Ack | Reply::Error(_)));
            all.extend(replies);
            if done || n == 0 {
                return Ok(all);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLA_F_NESTED;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Attributes of a serialized request: (type, value).
    fn attrs(msg: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 16 + 4; // nlmsghdr + genlmsghdr
        while at + 4 <= msg.len() {
            let len = usize::from(u16_at(msg, at));
            out.push((u16_at(msg, at + 2), msg[at + 4..at + len].to_vec()));
            at += (len + 3) & !3;
        }
        out
    }

    #[test]
    fn connect_request_matches_the_uapi_layout() {
        let c = Connect {
            index: Some(3),
            size: 1 << 30,
            block_size: 4096,
            timeout: 30,
            dead_conn_timeout: 120,
            server_flags: 0x1ad,
            backend: "blockd:vol1".into(),
        };
        let msg = request(0x1c, 7, connect(&c, &[10, 11], false));
        // nlmsghdr: length, type = family id, flags REQUEST|ACK, seq.
        assert_eq!(u32_at(&msg, 0) as usize, msg.len());
        assert_eq!(u16_at(&msg, 4), 0x1c);
        assert_eq!(u16_at(&msg, 6), 0x01 | 0x04);
        assert_eq!(u32_at(&msg, 8), 7);
        // genlmsghdr: cmd CONNECT (1), version 1.
        assert_eq!((msg[16], msg[17]), (1, 1));
        let a = attrs(&msg);
        let find = |t: u16| {
            a.iter()
                .find(|(k, _)| *k & !NLA_F_NESTED == t)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(u32::from_ne_bytes(find(1).try_into().unwrap()), 3);
        assert_eq!(u64::from_ne_bytes(find(2).try_into().unwrap()), 1 << 30);
        assert_eq!(u64::from_ne_bytes(find(3).try_into().unwrap()), 4096);
        assert_eq!(u64::from_ne_bytes(find(4).try_into().unwrap()), 30);
        assert_eq!(u64::from_ne_bytes(find(5).try_into().unwrap()), 0x1ad);
        assert_eq!(u64::from_ne_bytes(find(6).try_into().unwrap()), 1);
        assert_eq!(u64::from_ne_bytes(find(8).try_into().unwrap()), 120);
        assert_eq!(find(10), b"blockd:vol1\0");
        // NBD_ATTR_SOCKETS is nested: two NBD_SOCK_ITEMs (nested), each one
        // NBD_SOCK_FD u32.
        let (kind, socks) = a.iter().find(|(k, _)| *k & !NLA_F_NESTED == 7).unwrap();
        assert_ne!(kind & NLA_F_NESTED, 0);
        assert_eq!(socks.len(), 24);
        for (i, fd) in [10u32, 11].iter().enumerate() {
            let item = &socks[i * 12..i * 12 + 12];
            assert_eq!(u16_at(item, 0), 12);
            assert_eq!(u16_at(item, 2), 1 | NLA_F_NESTED);
            assert_eq!((u16_at(item, 4), u16_at(item, 6)), (8, 1));
            assert_eq!(u32_at(item, 8), *fd);
        }
    }

    #[test]
    fn reconfigure_and_disconnect_carry_only_what_they_need() {
        let c = Connect {
            index: Some(5),
            size: 1,
            block_size: 512,
            timeout: 10,
            dead_conn_timeout: 60,
            server_flags: 1,
            backend: "x".into(),
        };
        let msg = request(0x1c, 1, connect(&c, &[4], true));
        assert_eq!(msg[16], 3, "RECONFIGURE");
        let kinds: Vec<u16> = attrs(&msg).iter().map(|(k, _)| k & !NLA_F_NESTED).collect();
        assert_eq!(kinds, [1, 10, 4, 8, 7], "index, backend, timeouts, sockets");
        let msg = request(
            0x1c,
            2,
            Nbd {
                cmd: CMD_DISCONNECT,
                attrs: vec![Attr::Index(5)],
            },
        );
        assert_eq!(msg[16], 2);
        assert_eq!(attrs(&msg), [(1, 5u32.to_ne_bytes().to_vec())]);
    }

    #[test]
    fn status_reply_and_errors_parse() {
        // A STATUS reply as the kernel builds it, then an ACK.
        let reply = Nbd {
            cmd: CMD_STATUS,
            attrs: vec![Attr::DeviceList(vec![(0, true), (1, false)])],
        };
        let mut bytes = request(0x1c, 9, reply);
        let ack: [u8; 36] = {
            let mut a = [0u8; 36];
            a[..4].copy_from_slice(&36u32.to_ne_bytes());
            a[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
            a[8..12].copy_from_slice(&9u32.to_ne_bytes());
            a
        };
        bytes.extend_from_slice(&ack);
        let replies = parse_replies::<GenlMessage<Nbd>>(&bytes).unwrap();
        assert_eq!(replies.len(), 2);
        let Reply::Message(m) = &replies[0] else {
            panic!("{replies:?}")
        };
        assert_eq!(
            m.payload.attrs,
            [Attr::DeviceList(vec![(0, true), (1, false)])]
        );
        assert_eq!(replies[1], Reply::Ack);
        assert_eq!(connected(&replies, 0), Some(true));
        assert_eq!(connected(&replies, 1), Some(false));
        assert_eq!(connected(&replies, 2), None);
        // An error: -ENOENT.
        let mut err = ack;
        err[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        let replies = parse_replies::<GenlMessage<Nbd>>(&err).unwrap();
        assert_eq!(replies, [Reply::Error(2)]);
    }

    #[test]
    fn family_lookup_names_nbd() {
        let msg = family_request(1);
        assert_eq!(u16_at(&msg, 4), 0x10, "GENL_ID_CTRL");
        assert_eq!(msg[16], 3, "CTRL_CMD_GETFAMILY");
        // Without NLM_F_ACK a kernel that has the family answers with its
        // message only, and an exchange waiting for the ACK never ends.
        assert_eq!(
            u16_at(&msg, 6),
            NLM_F_REQUEST | NLM_F_ACK,
            "NLM_F_REQUEST | NLM_F_ACK"
        );
        let a = attrs(&msg);
        assert_eq!(a, [(2, b"nbd\0".to_vec())], "CTRL_ATTR_FAMILY_NAME");
    }
}
