//! The host's side: greet, then answer jobs in order until the agent goes.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frame::{read_frame, write_frame, Answer, FrameError, Greeting, Job, PROTOCOL_VERSION};

/// The socket the supervisor hands a host: its standard input.
pub fn socket_from_stdin() -> std::io::Result<UnixStream> {
    Ok(UnixStream::from(
        std::io::stdin().as_fd().try_clone_to_owned()?,
    ))
}

/// Greets the agent, then answers each job with `handle`, one at a time, on a thread of its
/// own, while this thread keeps reading. Returns as soon as the agent closes its end — also
/// while a job is stuck in the library, so the caller should exit the process right away.
pub fn serve<J, A, H>(socket: UnixStream, mut handle: H) -> Result<(), FrameError>
where
    J: DeserializeOwned + Send + 'static,
    A: Serialize + Send + 'static,
    H: FnMut(J) -> A + Send + 'static,
{
    let mut reader = socket.try_clone()?;
    let mut writer = socket;
    write_frame(
        &mut writer,
        &Greeting {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        },
    )?;
    let (jobs, queue) = mpsc::channel::<Job<J>>();
    std::thread::Builder::new()
        .name("host-jobs".into())
        .spawn(move || {
            for Job { id, job } in queue {
                let answer = handle(job);
                if let Err(e) = write_frame(&mut writer, &Answer { id, answer }) {
                    tracing::error!(error = %e, "the agent's socket failed; the host stops answering");
                    break;
                }
            }
        })?;
    while let Some(job) = read_frame::<Job<J>>(&mut reader)? {
        if jobs.send(job).is_err() {
            break;
        }
    }
    Ok(())
}
