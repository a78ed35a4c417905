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
