//! `keyport origins allow/deny/revoke/list`: the user's decisions persist in origins.toml
//! beside the config, the administrator's lists show as such, and bad origins are refused.

mod cli_common;

use cli_common::{one_line_failure, stderr, stdout, Cli};

/// `keyport origins list` as (origin, standing, source) rows.
fn list(cli: &Cli) -> Vec<(String, String, String)> {
    let out = cli.run(&["origins", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    stdout(&out)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "{l:?}");
            (
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].trim_matches(['(', ')']).to_owned(),
            )
        })
        .collect()
}

fn row(origin: &str, standing: &str, source: &str) -> (String, String, String) {
    (origin.to_owned(), standing.to_owned(), source.to_owned())
}

fn ok(cli: &Cli, args: &[&str]) -> String {
    let out = cli.run(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "{args:?}");
    stdout(&out)
}

#[test]
fn origins_round_trip() {
    let cli = Cli::new();
    let file = cli.dir().join("origins.toml");
    let config_row = row("https://portal.example", "Allowed", "config");
    assert_eq!(list(&cli), std::slice::from_ref(&config_row));
    assert!(!file.exists());

    let sign = "https://sign.example";
    let other = "https://other.example:8443";
    assert!(ok(&cli, &["origins", "allow", sign]).contains(sign));
    assert!(ok(&cli, &["origins", "allow", other]).contains(other));
    assert_eq!(
        list(&cli),
        [
            row(other, "Allowed", "user"),
            config_row.clone(),
            row(sign, "Allowed", "user"),
        ]
    );
    let saved = std::fs::read_to_string(&file).expect("origins.toml beside the config");
    assert!(saved.contains(sign) && saved.contains(other), "{saved}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "origins.toml is private");

    // Deny replaces the approval.
    assert!(ok(&cli, &["origins", "deny", sign]).contains("denied"));
    assert_eq!(
        list(&cli),
        [
            row(other, "Allowed", "user"),
            config_row.clone(),
            row(sign, "Denied", "user"),
        ]
    );

    // Revoke forgets the decision; a second revoke says there was none.
    assert!(ok(&cli, &["origins", "revoke", sign]).contains("revoked"));
    assert!(ok(&cli, &["origins", "revoke", sign]).contains("no decision"));
    assert!(ok(&cli, &["origins", "revoke", other]).contains("revoked"));
    assert_eq!(list(&cli), std::slice::from_ref(&config_row));
    // The administrator's entry cannot be revoked by the user.
    assert!(ok(&cli, &["origins", "revoke", "https://portal.example"]).contains("no decision"));
    assert_eq!(list(&cli), [config_row]);
    let saved = std::fs::read_to_string(&file).expect("origins.toml");
    assert!(!saved.contains("sign.example"), "{saved}");
}

#[test]
fn bad_origins_are_refused_in_one_line() {
    let cli = Cli::new();
    for bad in [
        "not an origin",
        "https://sign.example/path",
        "ftp://sign.example",
        "",
    ] {
        for action in ["allow", "deny"] {
            let out = cli.run(&["origins", action, bad]);
            let line = one_line_failure(&out);
            assert!(line.contains("not an origin"), "{action} {bad:?}: {line}");
        }
    }
    assert!(
        !cli.dir().join("origins.toml").exists(),
        "nothing was recorded"
    );
    // A broken decisions file is reported, not ignored and not overwritten.
    std::fs::write(cli.dir().join("origins.toml"), "allowed = 3\n").expect("write");
    let out = cli.run(&["origins", "list"]);
    let line = one_line_failure(&out);
    assert!(line.contains("origins.toml"), "{line}");
    let out = cli.run(&["origins", "allow", "https://sign.example"]);
    one_line_failure(&out);
    assert_eq!(
        std::fs::read_to_string(cli.dir().join("origins.toml")).expect("read"),
        "allowed = 3\n"
    );
}

/// Issue 14, snag 12: a URL with a path is refused for what it is, with the origin to type
/// instead; an empty list says so rather than printing nothing; each subcommand's argument is
/// described in its help.
#[test]
fn a_pasted_url_gets_the_origin_to_use_and_an_empty_list_says_so() {
    let cli = Cli::new();
    let out = cli.run(&["origins", "allow", "https://bank.example/path?x=1"]);
    let line = one_line_failure(&out);
    assert!(
        line.contains("no path, query or fragment; use https://bank.example"),
        "{line}"
    );
    assert!(!line.contains("bad host"), "{line}");
    let out = cli.run(&["origins", "deny", "https://bank.example:8443/"]);
    let line = one_line_failure(&out);
    assert!(line.ends_with("use https://bank.example:8443"), "{line}");

    // The test config lists one origin; an empty config lists none.
    std::fs::write(&cli.config, "").expect("empty config");
    let text = ok(&cli, &["origins", "list"]);
    assert!(
        text.starts_with("no origin is allowed or denied yet"),
        "{text:?}"
    );

    for sub in ["allow", "deny", "revoke"] {
        let text = ok(&cli, &["origins", sub, "--help"]);
        assert!(text.contains("scheme://host[:port]"), "{sub}: {text}");
    }
    let text = ok(&cli, &["sign", "--help"]);
    for wanted in [
        "--cert <ID>",
        "as `keyport certs` shows it",
        "--in <FILE>",
        "The file to sign",
        "--out <FILE>",
        "detached CMS",
    ] {
        assert!(
            text.contains(wanted),
            "sign --help lacks {wanted:?}: {text}"
        );
    }
}
