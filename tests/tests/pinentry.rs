//! The agent's pinentry client against the scripted pinentry, a real Assuan peer in its own
//! process.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use agent::pinentry::{Choice, ConfirmDialog, DialogCancel, DialogError, PinDialog, Pinentry};
use keyport_e2e::pinentry::{Button, Command, Script, Step};

const PROGRAM: &str = env!("CARGO_BIN_EXE_keyport-test-pinentry");

fn setup() -> (tempfile::TempDir, Script, Pinentry) {
    let dir = tempfile::tempdir().unwrap();
    let script = Script::new(dir.path()).unwrap();
    let mut pinentry = Pinentry::new(PROGRAM).timeout(Duration::from_secs(20));
    for (key, value) in script.env() {
        pinentry = pinentry.env(key, value);
    }
    (dir, script, pinentry)
}

fn pin_dialog(title: &str) -> PinDialog {
    PinDialog {
        title: title.into(),
        description: "Sign «Loan contract»".into(),
        prompt: "PIN:".into(),
        error: None,
        ok: "Sign".into(),
        cancel: "Cancel".into(),
    }
}

fn confirm_dialog() -> ConfirmDialog {
    ConfirmDialog {
        title: "KeyPort".into(),
        description: "Allow https://portal.example to use your certificates?".into(),
        error: None,
        ok: "Allow always".into(),
        cancel: "Deny".into(),
        not_ok: Some("Allow once".into()),
    }
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn reads_a_pin_and_logs_the_dialog_but_not_the_pin() {
    let (_dir, script, pinentry) = setup();
    script
        .push(&Step::pin("12%34 56").expect(Command::GetPin))
        .unwrap();
    let dialog = PinDialog {
        error: Some("Wrong PIN. Few tries left.".into()),
        ..pin_dialog("KeyPort: sign")
    };
    let pin = pinentry.get_pin(&dialog, &DialogCancel::new()).unwrap();
    assert_eq!(pin.as_str(), "12%34 56");

    let dialogs = script.dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    let shown = &dialogs[0];
    assert_eq!(shown.title.as_deref(), Some("KeyPort: sign"));
    assert_eq!(shown.description.as_deref(), Some("Sign «Loan contract»"));
    assert_eq!(shown.prompt.as_deref(), Some("PIN:"));
    assert_eq!(shown.error.as_deref(), Some("Wrong PIN. Few tries left."));
    assert_eq!(shown.ok.as_deref(), Some("Sign"));
    assert_eq!(shown.cancel.as_deref(), Some("Cancel"));
    assert_eq!(shown.timeout.as_deref(), Some("20"));
    assert_eq!(shown.command.as_deref(), Some("GETPIN"));
    assert_eq!(shown.answered.as_deref(), Some("pin"));
    assert!(shown.script_errors.is_empty(), "{:?}", shown.script_errors);
    let log = std::fs::read_to_string(script.log_path()).unwrap();
    assert!(
        !log.contains("12%34"),
        "the transcript holds the PIN: {log}"
    );
    // The pinentry was told goodbye and has exited (and been reaped).
    assert!(script
        .transcript()
        .unwrap()
        .iter()
        .any(|e| e.cmd.as_deref() == Some("BYE")));
    assert!(process_gone(shown.pid));
}

#[test]
fn sends_terminal_options_only_when_known() {
    let (_dir, script, pinentry) = setup();
    script.push(&Step::confirm(Button::Ok)).unwrap();
    script.push(&Step::confirm(Button::Ok)).unwrap();
    let cancel = DialogCancel::new();
    pinentry.confirm(&confirm_dialog(), &cancel).unwrap();
    pinentry
        .clone()
        .tty_name("/dev/pts/7")
        .tty_type("xterm")
        .lc_ctype("C.UTF-8")
        .confirm(&confirm_dialog(), &cancel)
        .unwrap();
    let dialogs = script.dialogs().unwrap();
    assert_eq!(dialogs.len(), 2);
    assert!(dialogs[0].options.is_empty(), "{:?}", dialogs[0].options);
    assert_eq!(
        dialogs[1].options,
        ["ttyname=/dev/pts/7", "ttytype=xterm", "lc-ctype=C.UTF-8"]
    );
}

#[test]
fn cancel_on_a_pin_dialog_is_cancelled() {
    let (_dir, script, pinentry) = setup();
    script.push(&Step::cancel()).unwrap();
    let err = pinentry
        .get_pin(&pin_dialog("t"), &DialogCancel::new())
        .unwrap_err();
    assert!(matches!(err, DialogError::Cancelled), "{err:?}");
    assert_eq!(
        script.dialogs().unwrap()[0].answered.as_deref(),
        Some("cancel")
    );
}

#[test]
fn confirm_buttons_map_to_choices() {
    let (_dir, script, pinentry) = setup();
    for button in [Button::Ok, Button::Notok, Button::Cancel] {
        script
            .push(&Step::confirm(button).expect(Command::Confirm))
            .unwrap();
    }
    let cancel = DialogCancel::new();
    assert_eq!(
        pinentry.confirm(&confirm_dialog(), &cancel).unwrap(),
        Choice::Ok
    );
    assert_eq!(
        pinentry.confirm(&confirm_dialog(), &cancel).unwrap(),
        Choice::NotOk
    );
    let err = pinentry.confirm(&confirm_dialog(), &cancel).unwrap_err();
    assert!(matches!(err, DialogError::Cancelled), "{err:?}");

    let dialogs = script.dialogs().unwrap();
    let answers: Vec<_> = dialogs.iter().map(|d| d.answered.as_deref()).collect();
    assert_eq!(answers, [Some("ok"), Some("notok"), Some("cancel")]);
    assert!(dialogs
        .iter()
        .all(|d| d.not_ok.as_deref() == Some("Allow once")));
}

#[test]
fn a_dialog_past_its_deadline_is_killed() {
    let (_dir, script, pinentry) = setup();
    script.push(&Step::hang()).unwrap();
    let started = Instant::now();
    let err = pinentry
        .timeout(Duration::from_millis(400))
        .get_pin(&pin_dialog("t"), &DialogCancel::new())
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, DialogError::Timeout), "{err:?}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let dialogs = script.dialogs().unwrap();
    assert_eq!(dialogs[0].answered.as_deref(), Some("hang"));
    // SETTIMEOUT is in whole seconds, rounded up.
    assert_eq!(dialogs[0].timeout.as_deref(), Some("1"));
    assert!(process_gone(dialogs[0].pid));
}

#[test]
fn dialog_cancel_from_another_thread_closes_the_open_dialog() {
    let (_dir, script, pinentry) = setup();
    script.push(&Step::hang()).unwrap();
    let cancel = DialogCancel::new();
    let shower = {
        let cancel = cancel.clone();
        std::thread::spawn(move || pinentry.confirm(&confirm_dialog(), &cancel))
    };
    // Cancel only once the dialog is really open and waiting for the user.
    let open = script
        .wait_for(Duration::from_secs(20), |entries| {
            entries
                .iter()
                .any(|e| e.answered.as_deref() == Some("hang"))
        })
        .unwrap();
    let started = Instant::now();
    cancel.cancel();
    let err = shower.join().unwrap().unwrap_err();
    assert!(matches!(err, DialogError::Cancelled), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(process_gone(open[0].pid));
}

#[test]
fn texts_with_percent_and_line_breaks_round_trip() {
    let (_dir, script, pinentry) = setup();
    script.push(&Step::confirm(Button::Ok)).unwrap();
    let title = "100% «sure»\nsecond line\r\n%0A literally";
    let description = "签署文件：«贷款合同 2026-114»\n摘要：3f2a9c0d11aa22bb…";
    let dialog = ConfirmDialog {
        title: title.into(),
        description: description.into(),
        ..confirm_dialog()
    };
    pinentry.confirm(&dialog, &DialogCancel::new()).unwrap();
    let shown = &script.dialogs().unwrap()[0];
    assert_eq!(shown.title.as_deref(), Some(title));
    assert_eq!(shown.description.as_deref(), Some(description));
}

#[test]
fn four_concurrent_dialogs_consume_four_steps_exactly_once() {
    let (_dir, script, pinentry) = setup();
    let pins = ["1111", "2222", "3333", "4444"];
    for pin in pins {
        script.push(&Step::pin(pin)).unwrap();
    }
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let pinentry = pinentry.clone();
            std::thread::spawn(move || {
                pinentry
                    .get_pin(&pin_dialog(&format!("dialog {i}")), &DialogCancel::new())
                    .map(|pin| pin.as_str().to_owned())
            })
        })
        .collect();
    let got: BTreeSet<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert_eq!(got, pins.iter().map(|p| p.to_string()).collect());
    assert_eq!(script.consumed().unwrap(), 4);
    let dialogs = script.dialogs().unwrap();
    assert_eq!(dialogs.len(), 4);
    assert!(dialogs.iter().all(|d| d.answered.as_deref() == Some("pin")));

    // A fifth dialog finds the script exhausted: cancelled, and the transcript says why.
    let err = pinentry
        .get_pin(&pin_dialog("fifth"), &DialogCancel::new())
        .unwrap_err();
    assert!(matches!(err, DialogError::Cancelled), "{err:?}");
    let fifth = &script.dialogs().unwrap()[4];
    assert_eq!(fifth.script_errors, ["script exhausted"]);
}

#[test]
fn a_step_of_the_wrong_kind_fails_loudly() {
    let (_dir, script, pinentry) = setup();
    script
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    let err = pinentry
        .get_pin(&pin_dialog("t"), &DialogCancel::new())
        .unwrap_err();
    let DialogError::Pinentry { message, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        message.contains("expected CONFIRM, got GETPIN"),
        "{message}"
    );
    assert_eq!(
        script.dialogs().unwrap()[0].script_errors,
        ["expected CONFIRM, got GETPIN"]
    );
}

#[test]
fn the_helper_finds_the_built_binary() {
    assert_eq!(
        keyport_e2e::pinentry::program().canonicalize().unwrap(),
        Path::new(PROGRAM).canonicalize().unwrap()
    );
}

mod dialogs {
    use super::*;
    use agent::dialog::{
        Consent, Document, Language, OriginDecision, PinState, Signer, Texts, Unlock,
    };

    const DIGEST: [u8; 32] = [0xa5; 32];

    fn signer() -> Signer<'static> {
        Signer {
            origin: "https://portal.example",
            holder: "张伟",
            issuer: "KeyPort Test CA",
            token_label: "SoftHSM token",
        }
    }

    #[test]
    fn a_chinese_sign_dialog_with_pin_arrives_intact() {
        let (_dir, script, pinentry) = setup();
        script
            .push(&Step::pin("654321").expect(Command::GetPin))
            .unwrap();
        let document = Document {
            title: "贷款合同 100%\n第二行",
            summary: Some("五年期贷款"),
            digest: &DIGEST,
        };
        let state = PinState {
            wrong_pin: true,
            final_try: true,
            ..PinState::default()
        };
        let dialog = Texts::new(Language::ZhCn).sign(&signer(), &document, Unlock::Pin(state));
        let consent = dialog.ask(&pinentry, &DialogCancel::new()).unwrap();
        let Consent::Pin(pin) = consent else {
            panic!("{consent:?}");
        };
        assert_eq!(pin.as_str(), "654321");
        let shown = &script.dialogs().unwrap()[0];
        let description = shown.description.as_deref().unwrap();
        for part in [
            "网站 https://portal.example 请求您签署一份文件。",
            "“贷款合同 100% 第二行”",
            "“张伟”",
            "a5a5a5a5a5a5a5a5…",
            "“五年期贷款”",
        ] {
            assert!(
                description.contains(part),
                "{part:?} not in {description:?}"
            );
        }
        assert_eq!(
            shown.error.as_deref(),
            Some("PIN 码错误。仅剩最后一次机会：如再输错 PIN 码，USB Key 将被锁定。")
        );
        assert_eq!(shown.ok.as_deref(), Some("签署(_S)"));
    }

    #[test]
    fn origin_approval_answers_are_decisions() {
        let (_dir, script, pinentry) = setup();
        for button in [Button::Ok, Button::Notok, Button::Cancel] {
            script
                .push(&Step::confirm(button).expect(Command::Confirm))
                .unwrap();
        }
        let texts = Texts::new(Language::En);
        let dialog = texts.origin_approval("https://portal.example");
        let decisions: Vec<_> = (0..3)
            .map(|_| {
                OriginDecision::from_answer(pinentry.confirm(&dialog, &DialogCancel::new()))
                    .unwrap()
            })
            .collect();
        assert_eq!(
            decisions,
            [
                OriginDecision::AllowOnce,
                OriginDecision::AllowAlways,
                OriginDecision::Deny
            ]
        );
        let shown = &script.dialogs().unwrap()[0];
        assert_eq!(
            shown.description.as_deref().map(|d| d.lines().next()),
            Some(Some(
                "Allow https://portal.example to use your certificates?"
            ))
        );
        assert_eq!(shown.not_ok.as_deref(), Some("Allow _always"));
    }

    #[test]
    fn a_pin_pad_dialog_is_a_confirm_without_a_pin_field() {
        let (_dir, script, pinentry) = setup();
        script
            .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
            .unwrap();
        let dialog = Texts::new(Language::En).login(&signer(), Unlock::PinPad(PinState::default()));
        let consent = dialog.ask(&pinentry, &DialogCancel::new()).unwrap();
        assert!(matches!(consent, Consent::Confirmed));
        let shown = &script.dialogs().unwrap()[0];
        assert_eq!(shown.command.as_deref(), Some("CONFIRM"));
        assert_eq!(shown.prompt, None);
        let description = shown.description.as_deref().unwrap();
        assert!(description.contains("Log in to https://portal.example as «张伟»?"));
        assert!(
            description.contains("Enter your PIN on the reader's keypad after you choose Log in.")
        );
    }
}

/// The client against GnuPG's real `pinentry-tty`, on a tmux pane standing in for the user's
/// terminal: the test types into the pane once the prompt shows. Skipped (with a note) where
/// pinentry-tty or tmux is missing.
mod real_pinentry_tty {
    use super::*;
    use std::process::Command as Run;

    struct Tmux(String);

    impl Tmux {
        fn start() -> Option<Self> {
            // One session per test: the tests of this binary run in parallel threads.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("keyport-pinentry-{}-{n}", std::process::id());
            let ok = Run::new("tmux")
                .args([
                    "new-session",
                    "-d",
                    "-x",
                    "200",
                    "-y",
                    "50",
                    "-s",
                    &name,
                    "sleep 600",
                ])
                .status()
                .ok()?
                .success();
            ok.then_some(Self(name))
        }

        fn tty(&self) -> String {
            let out = Run::new("tmux")
                .args(["display-message", "-p", "-t", &self.0, "#{pane_tty}"])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        }

        fn screen(&self) -> String {
            let out = Run::new("tmux")
                .args(["capture-pane", "-p", "-t", &self.0])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// Waits until the pane shows `text` for the `nth` time (from 1), then types `keys` and
        /// Enter.
        fn answer(&self, text: &str, nth: usize, keys: &str) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.screen().matches(text).count() < nth {
                assert!(
                    Instant::now() < deadline,
                    "never shown: {text:?}\n{}",
                    self.screen()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let sent = Run::new("tmux")
                .args(["send-keys", "-t", &self.0, "-l", keys])
                .status()
                .unwrap();
            assert!(sent.success());
            let sent = Run::new("tmux")
                .args(["send-keys", "-t", &self.0, "Enter"])
                .status()
                .unwrap();
            assert!(sent.success());
        }
    }

    impl Drop for Tmux {
        fn drop(&mut self) {
            let _ = Run::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .status();
        }
    }

    fn pinentry_tty() -> Option<(Tmux, Pinentry)> {
        let program = Path::new("/usr/bin/pinentry-tty");
        if !program.exists() {
            eprintln!("skipped: no /usr/bin/pinentry-tty");
            return None;
        }
        let Some(tmux) = Tmux::start() else {
            eprintln!("skipped: tmux is not available");
            return None;
        };
        let pinentry = Pinentry::new(program)
            .timeout(Duration::from_secs(30))
            .tty_name(tmux.tty())
            .tty_type("xterm")
            .lc_ctype("C.UTF-8");
        Some((tmux, pinentry))
    }

    #[test]
    fn reads_a_pin_typed_on_the_terminal() {
        let Some((tmux, pinentry)) = pinentry_tty() else {
            return;
        };
        let dialog = PinDialog {
            title: "KeyPort".into(),
            description: "Sign «Loan contract» 100%".into(),
            prompt: "PIN-for-test:".into(),
            ..PinDialog::default()
        };
        let shower = std::thread::spawn(move || pinentry.get_pin(&dialog, &DialogCancel::new()));
        tmux.answer("PIN-for-test:", 1, "12%34");
        let pin = shower.join().unwrap().unwrap();
        assert_eq!(pin.as_str(), "12%34");
        assert!(tmux.screen().contains("Sign «Loan contract» 100%"));
    }

    #[test]
    fn confirm_yes_and_no_on_the_terminal() {
        let Some((tmux, pinentry)) = pinentry_tty() else {
            return;
        };
        let dialog = ConfirmDialog {
            description: "Allow https://portal.example to use your certificates?".into(),
            ok: "Allow".into(),
            cancel: "Deny".into(),
            ..ConfirmDialog::default()
        };
        // One dialog per button: OK, the third button, Cancel.
        let dialog = ConfirmDialog {
            not_ok: Some("Once".into()),
            ..dialog
        };
        let mut answers = Vec::new();
        for (nth, key) in ["a", "o", "d"].into_iter().enumerate() {
            let (p, d) = (pinentry.clone(), dialog.clone());
            let shower = std::thread::spawn(move || p.confirm(&d, &DialogCancel::new()));
            tmux.answer("[ado]?", nth + 1, key);
            answers.push(shower.join().unwrap());
        }
        assert!(matches!(answers[0], Ok(Choice::Ok)), "{:?}", answers[0]);
        assert!(matches!(answers[1], Ok(Choice::NotOk)), "{:?}", answers[1]);
        assert!(
            matches!(answers[2], Err(DialogError::Cancelled)),
            "{:?}",
            answers[2]
        );
    }

    /// Issue 14, snag 11, on the real pinentry-tty: the Chinese access dialog puts each choice
    /// on its own key ("always allow" on a, not on the No key n), and the Chinese PIN prompt
    /// shows one colon.
    #[test]
    fn chinese_texts_on_the_terminal() {
        use agent::dialog::{Dialog, Language, OriginDecision, PinState, Signer, Texts, Unlock};
        let Some((tmux, pinentry)) = pinentry_tty() else {
            return;
        };
        let zh = Texts::new(Language::ZhCn);
        let access = zh.origin_approval("https://portal.example");
        let (p, d) = (pinentry.clone(), access.clone());
        let shower = std::thread::spawn(move || p.confirm(&d, &DialogCancel::new()));
        tmux.answer("[oda]?", 1, "a");
        let answer = OriginDecision::from_answer(shower.join().unwrap()).unwrap();
        assert_eq!(answer, OriginDecision::AllowAlways);
        let screen = tmux.screen();
        assert!(screen.contains("始终允许(A)"), "{screen}");
        assert!(!screen.contains("(No)"), "{screen}");

        let signer = Signer {
            origin: "https://portal.example",
            holder: "张伟",
            issuer: "KeyPort Test CA",
            token_label: "SoftHSM token",
        };
        let Dialog::Pin(dialog) = zh.login(&signer, Unlock::Pin(PinState::default())) else {
            panic!("a PIN dialog");
        };
        let shower = std::thread::spawn(move || pinentry.get_pin(&dialog, &DialogCancel::new()));
        tmux.answer("PIN 码", 1, "1234");
        let pin = shower.join().unwrap().unwrap();
        assert_eq!(pin.as_str(), "1234");
        let screen = tmux.screen();
        assert!(
            screen.lines().any(|l| l.trim_end() == "PIN 码:"),
            "{screen}"
        );
        assert!(!screen.contains("：:"), "{screen}");
        assert!(screen.contains("以“张伟”的身份登录"), "{screen}");
    }
}
