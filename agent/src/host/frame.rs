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

/// How much a [`FrameReader`] reads ahead: a signing job or its answer is under 200 bytes, a
/// token's certificate listing a few KiB; a larger frame is read into a buffer of its own.
const READ_AHEAD: usize = 16 * 1024;

/// Reads frames from one stream, taking whatever the stream has ready with each read: a frame
/// costs one read (often less, when several wait), not two (the length, then the body). The
/// bytes of a frame are zeroed in the buffer as soon as it is decoded. A stream read by one
/// keeps that one for its life: what it read ahead is in its buffer.
pub struct FrameReader<R> {
    input: R,
    buf: Zeroizing<Box<[u8]>>,
    /// `buf[start..end]` is read and not decoded yet.
    start: usize,
    end: usize,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R) -> Self {
        FrameReader {
            input,
            buf: Zeroizing::new(vec![0u8; READ_AHEAD].into_boxed_slice()),
            start: 0,
            end: 0,
        }
    }

    /// Reads one frame; `None` when the other side closed between frames (or within a length);
    /// an error when it closed within a body.
    pub fn read_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if !self.fill(4)? {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&self.buf[self.start..self.start + 4]);
        self.consume(4);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len > self.buf.len() {
            // A large frame (a batch, a long listing): a buffer of its own, zeroed on drop.
            let mut body = Zeroizing::new(vec![0u8; len]);
            let have = self.end - self.start;
            body[..have].copy_from_slice(&self.buf[self.start..self.end]);
            self.consume(have);
            self.input.read_exact(&mut body[have..])?;
            return Ok(Some(postcard::from_bytes(&body)?));
        }
        if !self.fill(len)? {
            return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let value = postcard::from_bytes(&self.buf[self.start..self.start + len]);
        self.consume(len);
        Ok(Some(value?))
    }

    /// Zeroes the next `n` buffered bytes and steps over them.
    fn consume(&mut self, n: usize) {
        self.buf[self.start..self.start + n].fill(0);
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads until at least `want` (≤ the buffer's size) bytes are buffered; `false` if the
    /// stream ended first.
    fn fill(&mut self, want: usize) -> io::Result<bool> {
        while self.end - self.start < want {
            if self.buf.len() - self.start < want {
                // Not room enough after the start: move what is buffered to the front, and
                // zero where it was.
                let have = self.end - self.start;
                self.buf.copy_within(self.start..self.end, 0);
                self.buf[have.max(self.start)..self.end].fill(0);
                (self.start, self.end) = (0, have);
            }
            let end = self.end;
            match self.input.read(&mut self.buf[end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    /// A stream that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        reads: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    type Job = ToHost<(String, Vec<u8>)>;

    fn jobs(sizes: &[usize]) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let bytes: Vec<u8> = (0..size).map(|b| (b % 251) as u8 + 1).collect();
            let job: Job = ToHost::Job {
                id: i as u64,
                job: ("sign".to_owned(), bytes.clone()),
            };
            write_frame(&mut wire, &job).unwrap();
            sent.push((i as u64, bytes));
        }
        (wire, sent)
    }

    /// Reads every frame; after each, nothing but the bytes not decoded yet is left unzeroed.
    fn read_all(reader: &mut FrameReader<impl Read>) -> Vec<(u64, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(frame) = reader.read_frame::<Job>().unwrap() {
            match frame {
                ToHost::Job { id, job } => got.push((id, job.1)),
                other => panic!("{other:?}"),
            }
            let (start, end) = (reader.start, reader.end);
            assert!(
                reader.buf[..start]
                    .iter()
                    .chain(&reader.buf[end..])
                    .all(|&b| b == 0),
                "bytes of a decoded frame left in the buffer"
            );
        }
        got
    }

    #[test]
    fn the_frame_reader_reads_what_was_written_however_the_stream_cuts_it() {
        // Small frames, one larger than the read-ahead, and frames that straddle its end.
        let (wire, sent) = jobs(&[0, 1, 90, READ_AHEAD - 20, 3, 2 * READ_AHEAD + 7, 90, 5000]);
        for step in [1, 2, 3, 5, 64, 4093, READ_AHEAD, usize::MAX] {
            let mut reader = FrameReader::new(Trickle {
                data: &wire,
                step,
                reads: 0,
            });
            assert_eq!(read_all(&mut reader), sent, "{step} bytes per read");
        }
    }

    #[test]
    fn the_frame_reader_takes_many_small_frames_in_one_read() {
        let (wire, sent) = jobs(&[90; 100]);
        let mut reader = FrameReader::new(Trickle {
            data: &wire,
            step: usize::MAX,
            reads: 0,
        });
        assert_eq!(read_all(&mut reader), sent);
        // 100 frames of 100 bytes: one read per 16 KiB, and the one that finds the end.
        assert!(reader.input.reads <= 3, "{} reads", reader.input.reads);
    }

    #[test]
    fn the_frame_reader_zeroes_a_frame_once_decoded() {
        let pin = b"PIN-123456".to_vec();
        let mut wire = Vec::new();
        let job: Job = ToHost::Job {
            id: 1,
            job: ("login".to_owned(), pin.clone()),
        };
        write_frame(&mut wire, &job).unwrap();
        // A second frame, cut: it stays buffered while the first is decoded.
        let mut second = Vec::new();
        write_frame(&mut second, &job).unwrap();
        wire.extend_from_slice(&second[..second.len() / 2]);
        let mut reader = FrameReader::new(wire.as_slice());
        assert!(reader.read_frame::<Job>().unwrap().is_some());
        let (start, end) = (reader.start, reader.end);
        assert!(
            reader.buf[..start].iter().all(|&b| b == 0),
            "decoded bytes left"
        );
        assert!(reader.buf[end..].iter().all(|&b| b == 0));
        assert!(matches!(reader.read_frame::<Job>(), Err(FrameError::Io(_))));
    }

    #[test]
    fn the_frame_reader_ends_within_a_length_and_fails_within_a_body() {
        let (wire, _) = jobs(&[40]);
        // Every cut of the frame: within the length a clean end, within the body an error.
        for cut in 0..wire.len() {
            let mut reader = FrameReader::new(&wire[..cut]);
            match (cut < 4, reader.read_frame::<Job>()) {
                (true, Ok(None)) | (false, Err(FrameError::Io(_))) => {}
                (_, other) => panic!("cut at {cut}: {other:?}"),
            }
        }
        // A frame larger than the buffer, cut in its body: an error too.
        let (wire, _) = jobs(&[2 * READ_AHEAD]);
        for cut in [5, READ_AHEAD, wire.len() - 1] {
            let mut reader = FrameReader::new(&wire[..cut]);
            assert!(
                matches!(reader.read_frame::<Job>(), Err(FrameError::Io(_))),
                "cut at {cut}"
            );
        }
        let mut reader = FrameReader::new(&[0xffu8, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            reader.read_frame::<Greeting>(),
            Err(FrameError::TooLarge(0xffff_ffff))
        ));
    }

    #[test]
    fn a_frame_round_trips() {
        let mut buf = Vec::new();
        let job = ToHost::Job {
            id: 7,
            job: ("sign".to_owned(), vec![1u8, 2, 3]),
        };
        write_frame(&mut buf, &job).unwrap();
        write_frame(&mut buf, &Greeting { version: 1, pid: 9 }).unwrap();
        let mut input = FrameReader::new(buf.as_slice());
        let back: ToHost<(String, Vec<u8>)> = input.read_frame().unwrap().unwrap();
        match back {
            ToHost::Job { id, job } => {
                assert_eq!((id, job), (7, ("sign".to_owned(), vec![1, 2, 3])))
            }
            other => panic!("{other:?}"),
        }
        let greeting: Greeting = input.read_frame().unwrap().unwrap();
        assert_eq!(greeting, Greeting { version: 1, pid: 9 });
        assert!(input.read_frame::<Greeting>().unwrap().is_none());
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut input = FrameReader::new(&[0xffu8, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            input.read_frame::<Greeting>(),
            Err(FrameError::TooLarge(0xffff_ffff))
        ));
    }

    #[test]
    fn a_cut_frame_is_an_error_not_a_clean_end() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Greeting { version: 1, pid: 9 }).unwrap();
        buf.pop();
        let mut input = FrameReader::new(buf.as_slice());
        assert!(matches!(
            input.read_frame::<Greeting>(),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn garbage_is_a_decoding_error() {
        let mut input = FrameReader::new(&[0u8, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(
            input.read_frame::<Greeting>(),
            Err(FrameError::Encoding(_) | FrameError::Io(_))
        ));
    }
}
