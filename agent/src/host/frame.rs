//! Frames between the agent and a host: a 4-byte big-endian length, then that many bytes of a
//! `postcard`-encoded message. A frame is at most [`MAX_FRAME`] bytes, checked before anything
//! is allocated. The first frame a host sends is [`Greeting`]; a greeting of another
//! [`PROTOCOL_VERSION`] ends the conversation.
//!
//! A job may carry a PIN (a login job), so every buffer a frame passes through is zeroed when
//! dropped.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The version of the messages below; bumped on any change to them or to the jobs they carry.
pub const PROTOCOL_VERSION: u16 = 3;

/// The largest frame either side accepts: room for a `sign.batch` of 1000 inputs or a token's
/// certificates, far below what would hurt.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A host's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    pub version: u16,
    pub pid: u32,
}

/// What the agent sends a host.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToHost<J> {
    /// A job, numbered by the agent; the host runs jobs one at a time, in order.
    Job { id: u64, job: J },
    /// Cancel job `id`: a job not started yet is skipped (answered by nothing); a running one
    /// sees its cancel flag set (a signing job stops before its next signature).
    Cancel { id: u64 },
}

/// What a host sends the agent about the job with the same id.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromHost<A> {
    /// A message before the answer (a signing job's progress); re-arms the call's deadline.
    Interim { id: u64, answer: A },
    /// The job's answer, its last message.
    Answer { id: u64, answer: A },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("the host connection failed")]
    Io(#[from] io::Error),
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("a frame could not be encoded or decoded")]
    Encoding(#[from] postcard::Error),
}

/// Writes one frame holding `value`.
pub fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), FrameError> {
    let body = Zeroizing::new(postcard::to_stdvec(value)?);
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(body.len()))?;
    // One write for the length and body, so a frame never interleaves with another writer's.
    let mut frame = Zeroizing::new(Vec::with_capacity(4 + body.len()));
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame; `None` when the other side closed cleanly between frames.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    input.read_exact(&mut body)?;
    Ok(Some(postcard::from_bytes(&body)?))
}

/// How much a [`FrameBuffer`] reads at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Frames out of a socket read as bytes arrive, never waiting (the agent reads its hosts'
/// answers so on its runtime: see `supervisor::read_answers_async`). Bytes go in with
/// [`FrameBuffer::fill_from`]; whole frames come out of [`FrameBuffer::next_frame`], checked as
/// [`read_frame`] checks them. Zeroed when dropped, and when it grows.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Zeroizing<Vec<u8>>,
    /// Where the unread bytes start in `buf`.
    start: usize,
}

impl std::fmt::Debug for FrameBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuffer")
            .field("unread", &(self.buf.len() - self.start))
            .finish_non_exhaustive()
    }
}

impl FrameBuffer {
    /// Reads what `socket` holds now, up to [`READ_CHUNK`] bytes, without waiting (a socket
    /// with nothing to read answers `WouldBlock`); the bytes read, 0 at the stream's end. The
    /// socket's own mode is left alone: writers of the same socket may block.
    pub fn fill_from(&mut self, socket: &impl std::os::fd::AsFd) -> io::Result<usize> {
        self.make_room(READ_CHUNK);
        let (n, _) = rustix::net::recv(
            socket,
            rustix::buffer::spare_capacity(&mut *self.buf),
            rustix::net::RecvFlags::DONTWAIT,
        )?;
        Ok(n)
    }

    /// The next whole frame's message; `None` until the bytes read hold one.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let unread = &self.buf[self.start..];
        let Some(header) = unread.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let Some(body) = unread.get(4..4 + len) else {
            return Ok(None);
        };
        let value = postcard::from_bytes(body)?;
        self.start += 4 + len;
        Ok(Some(value))
    }

    /// At the stream's end: part of a frame left unread is a cut frame, as [`read_frame`]
    /// reports it; `None` for a clean end between frames.
    pub fn cut_frame(&self) -> Option<FrameError> {
        (self.start < self.buf.len()).then(|| {
            FrameError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended inside a frame",
            ))
        })
    }

    /// Room for `more` bytes after the unread ones: the unread bytes move to the front, and a
    /// buffer too small is replaced (the old one zeroed as it is dropped).
    fn make_room(&mut self, more: usize) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() >= more {
            return;
        }
        let unread = self.buf.len() - self.start;
        if self.start > 0 && self.buf.capacity() >= unread + more {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(unread);
            self.start = 0;
            return;
        }
        let mut bigger = Zeroizing::new(Vec::with_capacity(unread + more));
        bigger.extend_from_slice(&self.buf[self.start..]);
        self.buf = bigger;
        self.start = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips() {
        let mut buf = Vec::new();
        let job = ToHost::Job {
            id: 7,
            job: ("sign".to_owned(), vec![1u8, 2, 3]),
        };
        write_frame(&mut buf, &job).unwrap();
        write_frame(&mut buf, &Greeting { version: 1, pid: 9 }).unwrap();
        let mut input = buf.as_slice();
        let back: ToHost<(String, Vec<u8>)> = read_frame(&mut input).unwrap().unwrap();
        match back {
            ToHost::Job { id, job } => {
                assert_eq!((id, job), (7, ("sign".to_owned(), vec![1, 2, 3])))
            }
            other => panic!("{other:?}"),
        }
        let greeting: Greeting = read_frame(&mut input).unwrap().unwrap();
        assert_eq!(greeting, Greeting { version: 1, pid: 9 });
        assert!(read_frame::<Greeting>(&mut input).unwrap().is_none());
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            read_frame::<Greeting>(&mut input),
            Err(FrameError::TooLarge(0xffff_ffff))
        ));
    }

    #[test]
    fn a_cut_frame_is_an_error_not_a_clean_end() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Greeting { version: 1, pid: 9 }).unwrap();
        buf.pop();
        let mut input = buf.as_slice();
        assert!(matches!(
            read_frame::<Greeting>(&mut input),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn a_frame_buffer_yields_frames_as_their_bytes_arrive() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &Greeting { version: 1, pid: 9 }).unwrap();
        let big = vec![7u8; 3 * READ_CHUNK];
        write_frame(&mut bytes, &big).unwrap();
        write_frame(
            &mut bytes,
            &Greeting {
                version: 2,
                pid: 10,
            },
        )
        .unwrap();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut frames = FrameBuffer::default();
        // Nothing sent yet: the read does not wait.
        let e = frames.fill_from(&ours).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(frames.next_frame::<Greeting>().unwrap().is_none());
        // The first frame in two pieces, cut inside its length.
        theirs.write_all(&bytes[..2]).unwrap();
        assert_eq!(frames.fill_from(&ours).unwrap(), 2);
        assert!(frames.next_frame::<Greeting>().unwrap().is_none());
        let writer = std::thread::spawn(move || {
            theirs.write_all(&bytes[2..]).unwrap();
        });
        let mut got = Vec::new();
        let mut read_big = None;
        loop {
            match frames.fill_from(&ours) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => panic!("{e}"),
            }
            loop {
                if got.is_empty() {
                    match frames.next_frame::<Greeting>().unwrap() {
                        Some(g) => got.push(g),
                        None => break,
                    }
                } else if read_big.is_none() {
                    match frames.next_frame::<Vec<u8>>().unwrap() {
                        Some(b) => read_big = Some(b),
                        None => break,
                    }
                } else {
                    match frames.next_frame::<Greeting>().unwrap() {
                        Some(g) => got.push(g),
                        None => break,
                    }
                }
            }
            if got.len() == 2 {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(got[0], Greeting { version: 1, pid: 9 });
        assert_eq!(read_big.as_deref(), Some(&big[..]));
        assert_eq!(
            got[1],
            Greeting {
                version: 2,
                pid: 10
            }
        );
        assert!(frames.cut_frame().is_none());
    }

    #[test]
    fn a_frame_buffer_reports_a_cut_frame_and_refuses_an_oversized_length() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut frames = FrameBuffer::default();
        theirs.write_all(&[0, 0, 0, 9, 1, 2]).unwrap();
        drop(theirs);
        assert_eq!(frames.fill_from(&ours).unwrap(), 6);
        assert!(frames.next_frame::<Greeting>().unwrap().is_none());
        assert_eq!(frames.fill_from(&ours).unwrap(), 0);
        assert!(matches!(frames.cut_frame(), Some(FrameError::Io(_))));

        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut frames = FrameBuffer::default();
        theirs.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        frames.fill_from(&ours).unwrap();
        assert!(matches!(
            frames.next_frame::<Greeting>(),
            Err(FrameError::TooLarge(0xffff_ffff))
        ));
    }

    #[test]
    fn garbage_is_a_decoding_error() {
        let mut input: &[u8] = &[0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            read_frame::<Greeting>(&mut input),
            Err(FrameError::Encoding(_) | FrameError::Io(_))
        ));
    }
}
