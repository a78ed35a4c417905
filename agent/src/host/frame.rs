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
    fn garbage_is_a_decoding_error() {
        let mut input: &[u8] = &[0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(
            read_frame::<Greeting>(&mut input),
            Err(FrameError::Encoding(_) | FrameError::Io(_))
        ));
    }
}
