//! PC/SC: readers and cards. (The hot-plug watcher is being written; see issue 5.)

use crate::config::Config;

/// Prints the readers and cards PC/SC sees, for `keyport doctor`.
pub fn doctor_readers(_config: &Config, problems: &mut Vec<String>) {
    println!("\nSmartcard readers (PC/SC):");
    match pcsc::Context::establish(pcsc::Scope::User) {
        Ok(ctx) => match ctx.list_readers_owned() {
            Ok(readers) if readers.is_empty() => println!("  none"),
            Ok(readers) => {
                for r in readers {
                    println!("  {}", r.to_string_lossy());
                }
            }
            Err(pcsc::Error::NoReadersAvailable) => println!("  none"),
            Err(e) => problems.push(format!("PC/SC could not list readers: {e}")),
        },
        Err(e) => {
            println!("  PC/SC is not available: {e}");
            problems.push(
                "pcscd is not running: smartcards and USB keys that use PC/SC will not be seen \
                 (apt install pcscd; systemctl start pcscd.socket)"
                    .into(),
            );
        }
    }
}
