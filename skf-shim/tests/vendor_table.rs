//! The shipped table of well-known SKF libraries (agent/data/skf.toml) is well formed: every
//! entry names its vendor, product, platform and a citable source, and every path is either
//! absolute or a bare file name for the platform.

use std::path::Path;

#[test]
fn every_shipped_entry_is_complete_and_cited() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/data/skf.toml");
    let text = std::fs::read_to_string(&path).expect("read agent/data/skf.toml");
    let table: toml::Table = text.parse().expect("valid TOML");
    let entries = table
        .get("skf_library")
        .and_then(|v| v.as_array())
        .expect("[[skf_library]] entries");
    assert!(!entries.is_empty());
    for entry in entries {
        let field = |k: &str| -> &str {
            entry
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("{entry:?} lacks {k}"))
        };
        assert_eq!(
            entry.as_table().map(|t| t.len()),
            Some(5),
            "{entry:?}: unknown keys"
        );
        let (os, lib, source) = (field("os"), field("path"), field("source"));
        assert!(!field("vendor").is_empty() && !field("product").is_empty());
        assert!(
            source.starts_with("github.com/"),
            "{lib}: source is a repository and file"
        );
        let ext_ok = match os {
            "linux" => lib.contains(".so"),
            "windows" => lib.ends_with(".dll"),
            "macos" => lib.ends_with(".dylib"),
            other => panic!("unknown os {other}"),
        };
        assert!(ext_ok, "{lib} is not a {os} library");
        assert!(
            lib.starts_with('/') || !lib.contains('/'),
            "{lib}: absolute, or a bare name for the loader's search path"
        );
    }
}
