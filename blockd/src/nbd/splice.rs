//! Large WRITE payloads moved from the socket into a pipe with `splice`,
//! and from the pipe into the volume file as they arrive.
//!
//! Read into a buffer, a payload costs two copies (out of the socket, into
//! the page cache), and the client may send more only as the first copy
//! frees its socket buffer: a Unix stream socket holds at most the
//! sender's `SO_SNDBUF` (about 200 KiB), so a 1 MiB WRITE passes in several
//! rounds of "client fills, server drains", each a wake-up on both sides.
//! `splice` from the socket moves the payload's pages into the pipe by
//! reference: the socket buffer is free again at once, and the copy into
//! the page cache is the only copy. Each piece is written as soon as the
//! pipe holds a step of it ([`crate::volume::engine::WRITE_STEP`]), so the
//! client sends the rest while the first steps are copied: the two
//! proceed side by side on two CPUs (kernel-notes/README.md, "Bulk
//! transfers and the page cache").
//!
//! A transport that is not a plain socket (TLS) reads payloads into
//! buffers as before.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncBufRead, AsyncRead, BufReader, Interest};

/// Capacity asked for each connection's pipe: the largest payload it
/// takes. `/proc/sys/fs/pipe-max-size` is 1 MiB by default; where the
/// kernel grants less, only payloads up to what it grants are spliced.
const PIPE_SIZE: usize = 1 << 20;

/// The socket under a connection's reader, when its bytes can be spliced.
#[derive(Debug, Clone, Copy)]
pub enum Socket<'a> {
    Unix(&'a tokio::net::UnixStream),
    Tcp(&'a tokio::net::TcpStream),
}

impl Socket<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }

    async fn readable(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.readable().await,
            Socket::Tcp(s) => s.readable().await,
        }
    }

    /// Whether the peer has gone for good, with nothing it sent left
    /// unread: the connection is closed both ways (or failed), so no reply
    /// can reach it. A peer that only closed its sending side (as libnbd
    /// does after NBD_CMD_DISC) still reads, and is not gone. Does not
    /// wait.
    pub fn gone(&self) -> bool {
        let fd = self.fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let closed = poll(&mut fds, Some(&now))
            .is_ok_and(|_| fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR));
        closed && rustix::io::ioctl_fionread(fd).is_ok_and(|n| n == 0)
    }

    /// Runs `f`, clearing the socket's readiness when it would block.
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.try_io(Interest::READABLE, f),
            Socket::Tcp(s) => s.try_io(Interest::READABLE, f),
        }
    }
}

/// A connection's read half, which may give its socket for splicing.
pub trait Source {
    /// The socket, when this transport's bytes are the socket's bytes.
    fn socket(&self) -> Option<Socket<'_>> {
        None
    }
}

impl Source for tokio::net::unix::OwnedReadHalf {
    fn socket(&self) -> Option<Socket<'_>> {
        Some(Socket::Unix(self.as_ref()))
    }
}

impl Source for tokio::net::tcp::OwnedReadHalf {
    fn socket(&self) -> Option<Socket<'_>> {
        Some(Socket::Tcp(self.as_ref()))
    }
}

/// TLS: the socket carries records, not the payload.
impl<T> Source for tokio::io::ReadHalf<T> {}

/// One connection's pipe, through which one payload passes at a time.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes of the current payload in the pipe.
    held: usize,
    /// Bytes of the current payload still to come from the socket.
    left: usize,
}

impl Pipe {
    /// A non-blocking pipe with [`PIPE_SIZE`] asked for.
    pub fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = match rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "cannot enlarge a payload pipe");
                rustix::pipe::fcntl_getpipe_size(&write)?
            }
        };
        Ok(Self {
            read,
            write,
            capacity,
            held: 0,
            left: 0,
        })
    }

    /// Bytes the pipe takes at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The end the payload's bytes are taken from.
    pub fn output(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Starts a payload of `len` bytes, the next on the connection.
    pub fn start(&mut self, len: usize) {
        debug_assert_eq!(self.held + self.left, 0, "a payload is still passing");
        self.left = len;
    }

    /// Whether the pipe has no room for another piece.
    fn full(&self) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.write, PollFlags::OUT)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&now))?;
        Ok(!fds[0].revents().contains(PollFlags::OUT))
    }

    /// Waits until the pipe holds `want` bytes of the payload, or all that
    /// is left of it, or as much as it has room for. Returns how many of
    /// them the caller is to take out now: at most `want`, and none only
    /// when the payload has been taken whole. Bytes `reader` holds
    /// buffered come first; the rest is spliced from its socket.
    pub async fn fill<R>(&mut self, reader: &mut BufReader<R>, want: usize) -> io::Result<usize>
    where
        R: AsyncRead + Source + Unpin,
    {
        loop {
            if self.held >= want || self.left == 0 {
                return Ok(self.held.min(want));
            }
            let buffered = reader.buffer();
            if !buffered.is_empty() {
                let n = buffered.len().min(self.left);
                match rustix::io::write(&self.write, &buffered[..n]) {
                    Ok(put) => {
                        Pin::new(&mut *reader).consume(put);
                        self.moved(put);
                        continue;
                    }
                    Err(Errno::AGAIN) => return Ok(self.held.min(want)),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(socket) = reader.get_ref().socket() else {
                return Err(io::Error::other("this transport cannot splice"));
            };
            let left = self.left;
            let write = self.write.as_fd();
            let splice = || {
                rustix::pipe::splice(
                    socket.fd(),
                    None,
                    write,
                    None,
                    left,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )
                .map_err(io::Error::from)
            };
            // Tried first without the runtime's readiness, which is only
            // cleared (below) once a full pipe has been ruled out: a
            // readiness cleared by a full pipe's EAGAIN would never come
            // back while the client waits for this reply.
            let moved = match splice() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.held > 0 && self.full()? {
                        return Ok(self.held.min(want));
                    }
                    match socket.try_read_io(splice) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            socket.readable().await?;
                            continue;
                        }
                        r => r,
                    }
                }
                r => r,
            };
            match moved {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.moved(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn moved(&mut self, n: usize) {
        self.held += n;
        self.left -= n;
    }

    /// Records that `n` bytes were taken out of the pipe.
    pub fn took(&mut self, n: usize) {
        self.held -= n;
    }

    /// Discards the rest of the payload, in the pipe and still to come (a
    /// payload that cannot be written).
    pub async fn skip<R>(&mut self, reader: &mut BufReader<R>) -> io::Result<()>
    where
        R: AsyncRead + Source + Unpin,
    {
        loop {
            self.clear()?;
            if self.left == 0 {
                return Ok(());
            }
            let want = self.left.min(self.capacity);
            self.fill(reader, want).await?;
        }
    }

    /// Empties the pipe: it holds nothing but the current payload.
    fn clear(&mut self) -> io::Result<()> {
        let mut scratch = vec![0u8; 64 << 10];
        loop {
            match rustix::io::read(&self.read, &mut scratch) {
                Ok(0) | Err(Errno::AGAIN) => {
                    self.held = 0;
                    return Ok(());
                }
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap_or(0).wrapping_add(seed))
            .collect()
    }

    /// Takes a payload of `len` out of the pipe in pieces of at most
    /// `step`, as a writer would.
    async fn take_all<R: AsyncRead + Source + Unpin>(
        pipe: &mut Pipe,
        reader: &mut BufReader<R>,
        len: usize,
        step: usize,
    ) -> io::Result<(Vec<u8>, usize)> {
        pipe.start(len);
        let mut out = Vec::new();
        let mut pieces = 0;
        while out.len() < len {
            let n = pipe.fill(reader, step.min(len - out.len())).await?;
            assert!(n > 0 && n <= step, "fill handed over {n} bytes");
            let mut piece = vec![0u8; n];
            let got = rustix::io::read(pipe.output(), &mut piece)?;
            assert_eq!(got, n, "the pipe held less than fill said");
            pipe.took(n);
            out.extend_from_slice(&piece);
            pieces += 1;
        }
        Ok((out, pieces))
    }

    fn pair(
        buffer: usize,
    ) -> (
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::UnixStream,
    ) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (r, w) = a.into_split();
        // Only the read half is used; the write half may close.
        drop(w);
        (BufReader::with_capacity(buffer, r), b)
    }

    /// A payload arrives partly in the reader's buffer and partly on the
    /// socket, in several sends; it comes out of the pipe whole and in
    /// order, and what follows it is still there for the reader.
    #[tokio::test]
    async fn a_payload_comes_out_of_the_pipe_whole_and_in_order() {
        let (mut reader, mut b) = pair(64 << 10);
        let payload = pattern(1 << 20, 7);
        let sent = payload.clone();
        let sender = tokio::spawn(async move {
            let mut first = b"HEAD".to_vec();
            first.extend_from_slice(&sent[..10_000]);
            b.write_all(&first).await.unwrap();
            for piece in sent[10_000..].chunks(100 << 10) {
                b.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            b.write_all(b"NEXT").await.unwrap();
            b
        });
        let mut head = [0u8; 4];
        reader.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HEAD");
        assert!(
            !reader.buffer().is_empty(),
            "nothing of the payload was buffered"
        );
        let mut pipe = Pipe::new().unwrap();
        let (got, _) = take_all(&mut pipe, &mut reader, payload.len(), 256 << 10)
            .await
            .unwrap();
        assert!(
            got == payload,
            "payload changed on its way through the pipe"
        );
        let mut next = [0u8; 4];
        reader.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
        drop(sender.await.unwrap());
    }

    /// A pipe with room for less than a piece hands over what it holds,
    /// and the payload still comes out whole.
    #[tokio::test]
    async fn a_pipe_that_fills_up_hands_over_what_it_holds() {
        let (mut reader, mut b) = pair(4096);
        let mut pipe = Pipe::new().unwrap();
        // One page.
        pipe.capacity = rustix::pipe::fcntl_setpipe_size(&pipe.write, 4096).unwrap();
        let payload = pattern(256 << 10, 3);
        let sent = payload.clone();
        let sender = tokio::spawn(async move {
            b.write_all(&sent).await.unwrap();
            b
        });
        let (got, pieces) = take_all(&mut pipe, &mut reader, payload.len(), 128 << 10)
            .await
            .unwrap();
        assert!(got == payload, "payload changed in a full pipe");
        assert!(pieces > 2, "a one-page pipe took 128 KiB pieces");
        drop(sender.await.unwrap());
    }

    /// A payload that cannot be written is skipped whole: the pipe is
    /// empty and the reader is at the next request.
    #[tokio::test]
    async fn a_skipped_payload_leaves_the_next_request_in_place() {
        let (mut reader, mut b) = pair(4096);
        let payload = pattern(700 << 10, 5);
        let mut sent = payload.clone();
        sent.extend_from_slice(b"NEXT");
        let sender = tokio::spawn(async move {
            b.write_all(&sent).await.unwrap();
            b
        });
        let mut pipe = Pipe::new().unwrap();
        pipe.start(payload.len());
        let n = pipe.fill(&mut reader, 256 << 10).await.unwrap();
        assert_eq!(n, 256 << 10);
        pipe.skip(&mut reader).await.unwrap();
        let mut probe = [0u8; 1];
        assert!(matches!(
            rustix::io::read(pipe.output(), &mut probe),
            Err(Errno::AGAIN)
        ));
        let mut next = [0u8; 4];
        reader.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
        drop(sender.await.unwrap());
    }

    /// The peer hanging up mid-payload is an error, not a short payload.
    #[tokio::test]
    async fn a_payload_cut_short_is_an_error() {
        let (mut reader, mut b) = pair(4096);
        b.write_all(&pattern(200 << 10, 1)).await.unwrap();
        drop(b);
        let mut pipe = Pipe::new().unwrap();
        let r = take_all(&mut pipe, &mut reader, 512 << 10, 256 << 10).await;
        assert!(r.is_err(), "a short payload was taken");
    }
}
