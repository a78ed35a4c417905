//! The READMEs' links resolve inside the repository (issue 14: a clone has no `../shared/…`).

use std::path::Path;

use keyport_e2e::harness::repo_root;

/// Every `](target)` of a Markdown file that is not a web address or an anchor.
fn local_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or_default().trim();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            links.push(target.to_owned());
        }
        rest = &rest[end..];
    }
    links
}

#[test]
fn readme_links_resolve_inside_the_repository() {
    let root = repo_root();
    let mut checked = 0;
    for readme in ["README.md", "browser-bridge/js/README.md"] {
        let path = root.join(readme);
        let text = std::fs::read_to_string(&path).expect("readme");
        assert!(
            !text.contains("../shared"),
            "{readme} points outside the repository"
        );
        let dir = path.parent().unwrap_or(Path::new("."));
        for link in local_links(&text) {
            assert!(
                dir.join(&link).exists(),
                "{readme}: the link {link} does not resolve"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "only {checked} links found: the parser is broken"
    );
}
