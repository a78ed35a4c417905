//! What the agent's dialogs say, in English and Simplified Chinese.
//!
//! Every builder returns a [`Dialog`]: a PIN dialog when the token needs a PIN typed, else a
//! confirm dialog (PIN-pad readers, tokens already logged in, origin approval). Consent and
//! PIN are one dialog: the PIN field sits under the description of what will be signed.
//!
//! Strings from the page (document title and summary) and from the certificate (holder,
//! issuer, subject) are untrusted. They are shown inside «guillemets», which are replaced
//! inside the string itself, so a title cannot close the quote and pose as agent text; control
//! and bidi-formatting characters are dropped (defence in depth: the bridge refuses them
//! already), and every such string is cut to a fixed number of characters. The most important
//! lines come first, because pinentry cuts an over-long description at its end.

use std::fmt;

use zeroize::Zeroizing;

use crate::pinentry::{Choice, ConfirmDialog, DialogCancel, DialogError, PinDialog, Pinentry};

/// The languages the dialogs speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Language {
    #[default]
    En,
    /// Simplified Chinese; also used for every other `zh` locale.
    ZhCn,
}

impl Language {
    /// The configured language (`"en"`, `"zh-CN"`, `"zh_CN"`, …); `None`, `""` or `"auto"`
    /// follow the locale of the agent's environment ([`Language::from_env`]).
    pub fn from_config(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some(tag) if !tag.is_empty() && !tag.eq_ignore_ascii_case("auto") => {
                Self::from_tag(tag)
            }
            _ => Self::from_env(),
        }
    }

    /// The language of the message locale: `LC_ALL`, else `LC_MESSAGES`, else `LANG`.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        Self::from_locale(
            var("LC_ALL").as_deref(),
            var("LC_MESSAGES").as_deref(),
            var("LANG").as_deref(),
        )
    }

    /// POSIX precedence over the three variables: the first set and non-empty one decides.
    pub fn from_locale(
        lc_all: Option<&str>,
        lc_messages: Option<&str>,
        lang: Option<&str>,
    ) -> Self {
        [lc_all, lc_messages, lang]
            .into_iter()
            .flatten()
            .find(|value| !value.is_empty())
            .map_or(Self::En, Self::from_tag)
    }

    fn from_tag(tag: &str) -> Self {
        if tag.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("zh")) {
            Self::ZhCn
        } else {
            Self::En
        }
    }
}

/// A dialog ready to show: a PIN dialog or a confirm dialog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dialog {
    Pin(PinDialog),
    Confirm(ConfirmDialog),
}

/// What the user gave in a consent dialog.
pub enum Consent {
    /// The user agreed and typed this PIN.
    Pin(Zeroizing<String>),
    /// The user agreed; no PIN was asked (PIN pad, or token already logged in).
    Confirmed,
}

impl fmt::Debug for Consent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consent::Pin(_) => f.write_str("Consent::Pin([redacted])"),
            Consent::Confirmed => f.write_str("Consent::Confirmed"),
        }
    }
}

impl Dialog {
    /// Shows a consent dialog. The user's "no", closing it, or the third button (consent
    /// dialogs have none) are all `Err(DialogError::Cancelled)`.
    pub fn ask(&self, pinentry: &Pinentry, cancel: &DialogCancel) -> Result<Consent, DialogError> {
        match self {
            Dialog::Pin(dialog) => pinentry.get_pin(dialog, cancel).map(Consent::Pin),
            Dialog::Confirm(dialog) => match pinentry.confirm(dialog, cancel)? {
                Choice::Ok => Ok(Consent::Confirmed),
                Choice::NotOk => Err(DialogError::Cancelled),
            },
        }
    }
}

/// The user's answer to the origin approval dialog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginDecision {
    /// "Allow always" — the third (NOTOK) button: remember the origin.
    AllowAlways,
    /// "Allow once" — the OK button, the one Enter presses: this connection only. The default
    /// grants the least; remembering an origin takes a deliberate choice.
    AllowOnce,
    /// "Deny" — the Cancel button, or closing the dialog.
    Deny,
}

impl OriginDecision {
    /// Maps the answer of [`Texts::origin_approval`]: OK → once, NOTOK → always, cancel →
    /// deny. A timeout or a broken pinentry stays an error: it is not the user's "no".
    pub fn from_answer(answer: Result<Choice, DialogError>) -> Result<Self, DialogError> {
        match answer {
            Ok(Choice::Ok) => Ok(Self::AllowOnce),
            Ok(Choice::NotOk) => Ok(Self::AllowAlways),
            Err(DialogError::Cancelled) => Ok(Self::Deny),
            Err(other) => Err(other),
        }
    }
}

/// Who asks and with what: the origin, the certificate and the token.
#[derive(Clone, Copy, Debug)]
pub struct Signer<'a> {
    /// The Origin header's value, e.g. `https://portal.example`.
    pub origin: &'a str,
    /// The certificate holder (subject common name, or the whole subject).
    pub holder: &'a str,
    /// The issuer's name (common name, or the whole issuer).
    pub issuer: &'a str,
    pub token_label: &'a str,
}

/// One document as the page describes it, and its digest.
#[derive(Clone, Copy, Debug)]
pub struct Document<'a> {
    /// The page's `display.title`.
    pub title: &'a str,
    /// The page's `display.summary`, if any.
    pub summary: Option<&'a str>,
    /// The digest to be signed; its first 8 bytes are shown as 16 hex digits.
    pub digest: &'a [u8],
}

/// Which document of a batch a per-document dialog is for.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    /// The item's label from the page, if it gave one.
    pub label: Option<&'a str>,
    /// From 0.
    pub index: usize,
    pub count: usize,
    /// The first per-document dialog of the request: it says the key asks for each document.
    pub announce: bool,
}

/// How the user unlocks the token for this operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlock {
    /// Type the PIN in the dialog.
    Pin(PinState),
    /// Type the PIN on the reader's PIN pad (protected authentication path): no PIN field.
    PinPad(PinState),
    /// The token is already logged in: consent only.
    LoggedIn,
}

/// What the token says about its PIN, and whether the last one typed was wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinState {
    /// The previous attempt in this request was a wrong PIN.
    pub wrong_pin: bool,
    /// CKF_USER_PIN_COUNT_LOW.
    pub count_low: bool,
    /// CKF_USER_PIN_FINAL_TRY.
    pub final_try: bool,
}

/// A certificate as the enrolment dialogs show it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShownCertificate<'a> {
    /// Subject, RFC 4514.
    pub subject: &'a str,
    /// The issuer's name (its CN).
    pub issuer: &'a str,
    /// notAfter, as a date (removal only).
    pub valid_until: Option<&'a str>,
    /// Serial number, hex (removal only).
    pub serial: Option<&'a str>,
}

/// What an import does to the certificate the key has now, for its dialog to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCertificate {
    /// The key has none (or the same one).
    None,
    /// A renewal for the same key: the new one is stored beside it, both are listed.
    KeptBeside,
    /// A renewal with `replace`: the present one is deleted.
    Replaced,
}

/// The dialog texts in one language.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Texts {
    pub language: Language,
}

/// Caps, in characters, on untrusted strings.
const TITLE_CHARS: usize = 80;
const SUMMARY_CHARS: usize = 160;
const NAME_CHARS: usize = 64;
const LABEL_CHARS: usize = 32;
/// How many of a batch's item labels the dialog lists.
const BATCH_LABELS_SHOWN: usize = 3;
const SUBJECT_CHARS: usize = 100;
/// Bytes of the digest shown (16 hex digits).
const DIGEST_PREFIX_BYTES: usize = 8;

impl Texts {
    pub fn new(language: Language) -> Self {
        Self { language }
    }

    fn zh(&self) -> bool {
        self.language == Language::ZhCn
    }

    /// "Allow https://portal.example to use your certificates?" with the buttons Allow once
    /// (OK, the default), Allow always (NOTOK) and Deny (Cancel); read the answer with
    /// [`OriginDecision::from_answer`].
    pub fn origin_approval(&self, origin: &str) -> ConfirmDialog {
        if self.zh() {
            ConfirmDialog {
                title: "KeyPort：新网站请求访问".into(),
                description: format!(
                    "允许 {origin} 使用您的证书吗？\n\n\
                     该网站将能查看您的证书并请求签名。每次签名前仍会征求您的同意。"
                ),
                error: None,
                // Each button names its own key (`_X`), so that pinentry-tty does not put
                // "always allow" on its No key (n).
                ok: "仅本次允许(_O)".into(),
                cancel: "拒绝(_D)".into(),
                not_ok: Some("始终允许(_A)".into()),
            }
        } else {
            ConfirmDialog {
                title: "KeyPort: a website asks for access".into(),
                description: format!(
                    "Allow {origin} to use your certificates?\n\n\
                     The site will see your certificates and may ask you to sign. \
                     You will still be asked before each signature."
                ),
                error: None,
                ok: "Allow _once".into(),
                cancel: "_Deny".into(),
                not_ok: Some("Allow _always".into()),
            }
        }
    }

    /// Consent (and the PIN, when one is typed) to sign one document.
    pub fn sign(&self, signer: &Signer<'_>, document: &Document<'_>, unlock: Unlock) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：签署文件",
                format!("{} 请求您签署一份文件。", asker_zh(signer.origin)),
                "签署(_S)".to_owned(),
            )
        } else {
            (
                "KeyPort: sign a document",
                format!("{} asks you to sign a document.", signer.origin),
                "Sign".to_owned(),
            )
        };
        let mut lines = vec![header, String::new()];
        lines.push(format!(
            "{}{}",
            self.pick("Document: ", "文件："),
            quote(document.title, TITLE_CHARS)
        ));
        lines.push(self.signer_line(signer));
        lines.push(format!(
            "{}{}",
            self.pick("Digest: ", "哈希值："),
            digest_prefix(document.digest)
        ));
        lines.push(self.token_line(signer.token_label));
        self.finish(title, lines, document.summary, ok, unlock)
    }

    /// Consent (and at most one PIN) to sign `count` documents: the batch's title, the first
    /// few items' labels (`labels[i]` empty for an item without one), the first digest.
    pub fn sign_batch(
        &self,
        signer: &Signer<'_>,
        first: &Document<'_>,
        count: usize,
        labels: &[String],
        unlock: Unlock,
    ) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：批量签署",
                format!("{} 请求您签署 {count} 份文件。", asker_zh(signer.origin)),
                format!("签署 {count} 份(_S)"),
            )
        } else {
            (
                "KeyPort: sign documents",
                format!("{} asks you to sign {count} documents.", signer.origin),
                format!("Sign {count}"),
            )
        };
        let mut lines = vec![header, String::new()];
        lines.push(format!(
            "{}{}",
            self.pick("Batch: ", "批次："),
            quote(first.title, TITLE_CHARS)
        ));
        lines.extend(self.batch_items_line(labels, count));
        lines.push(self.signer_line(signer));
        lines.push(if self.zh() {
            format!(
                "哈希值：{}（第一份，共 {count} 份）",
                digest_prefix(first.digest)
            )
        } else {
            format!("Digest: {} (first of {count})", digest_prefix(first.digest))
        });
        lines.push(self.token_line(signer.token_label));
        self.finish(title, lines, first.summary, ok, unlock)
    }

    /// Consent (and the PIN) for one document of a batch whose key asks for its PIN for every
    /// signature: one dialog per document, and the first of them says so.
    pub fn sign_batch_item(
        &self,
        signer: &Signer<'_>,
        document: &Document<'_>,
        item: BatchItem<'_>,
        unlock: Unlock,
    ) -> Dialog {
        let BatchItem {
            label,
            index,
            count,
            announce,
        } = item;
        let n = index + 1;
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：批量签署",
                format!("{} 请求您签署 {count} 份文件。", asker_zh(signer.origin)),
                format!("签署第 {n} 份(_S)"),
            )
        } else {
            (
                "KeyPort: sign documents",
                format!("{} asks you to sign {count} documents.", signer.origin),
                format!("Sign document {n}"),
            )
        };
        let mut lines = vec![header];
        if announce {
            lines.push(if self.zh() {
                format!("此密钥每签一份文件都要输入一次 PIN 码，共 {count} 份。")
            } else {
                format!("This key asks for your PIN for each of the {count} documents.")
            });
        }
        lines.push(String::new());
        lines.push(format!(
            "{}{}",
            self.pick("Batch: ", "批次："),
            quote(document.title, TITLE_CHARS)
        ));
        let item = label
            .filter(|l| !l.trim().is_empty())
            .map(|l| quote(l, LABEL_CHARS));
        lines.push(match (self.zh(), item) {
            (true, Some(item)) => format!("第 {n} 份（共 {count} 份）：{item}"),
            (true, None) => format!("第 {n} 份（共 {count} 份）"),
            (false, Some(item)) => format!("Document {n} of {count}: {item}"),
            (false, None) => format!("Document {n} of {count}"),
        });
        lines.push(self.signer_line(signer));
        lines.push(format!(
            "{}{}",
            self.pick("Digest: ", "哈希值："),
            digest_prefix(document.digest)
        ));
        lines.push(self.token_line(signer.token_label));
        self.finish(title, lines, document.summary, ok, unlock)
    }

    /// Consent to log in: "Log in to https://portal.example as «holder»".
    pub fn login(&self, signer: &Signer<'_>, unlock: Unlock) -> Dialog {
        let holder = quote(signer.holder, NAME_CHARS);
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：登录",
                format!("以{holder}的身份登录网站 {}？", signer.origin),
                "登录(_L)",
            )
        } else {
            (
                "KeyPort: log in",
                format!("Log in to {} as {holder}?", signer.origin),
                "Log in",
            )
        };
        let mut lines = vec![header, String::new()];
        lines.push(self.signer_line(signer));
        lines.push(self.token_line(signer.token_label));
        self.finish(title, lines, None, ok.to_owned(), unlock)
    }

    /// Consent to create a key pair on the token (`keys.generate`).
    pub fn generate_key(
        &self,
        origin: &str,
        token_label: &str,
        container: Option<&str>,
        algorithm: &str,
        subject: &str,
        unlock: Unlock,
    ) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：生成密钥对",
                format!("{} 请求在您的 USB Key 中生成新的密钥对。", asker_zh(origin)),
                "生成密钥对(_G)",
            )
        } else {
            (
                "KeyPort: create a key",
                format!("{origin} asks to create a new key on your token."),
                "Create key",
            )
        };
        let mut lines = vec![
            header,
            String::new(),
            format!(
                "{}{}",
                self.pick("Key type: ", "密钥类型："),
                quote(algorithm, LABEL_CHARS)
            ),
            format!(
                "{}{}",
                self.pick("For: ", "证书主体："),
                quote(subject, SUBJECT_CHARS)
            ),
            self.token_line(token_label),
        ];
        lines.extend(self.container_line(container));
        self.finish(title, lines, None, ok.to_owned(), unlock)
    }

    /// "Container: «name»" for an SKF key's container (GM/T 0016), when there is one.
    fn container_line(&self, container: Option<&str>) -> Option<String> {
        container.map(|name| {
            format!(
                "{}{}",
                self.pick("Container: ", "容器："),
                quote(name, LABEL_CHARS)
            )
        })
    }

    /// The PIN for the first signature of a key just made that asks for its PIN at every
    /// signature (`keys.generate` with `alwaysAuthenticate`): the one over its certificate
    /// request.
    pub fn sign_new_key_request(
        &self,
        origin: &str,
        token_label: &str,
        subject: &str,
        unlock: Unlock,
    ) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：签署证书请求",
                format!("{} 请求用刚生成的密钥签署证书请求。", asker_zh(origin)),
                "签署(_S)",
            )
        } else {
            (
                "KeyPort: sign the certificate request",
                format!("{origin} asks your new key to sign its certificate request."),
                "Sign",
            )
        };
        let lines = vec![
            header,
            self.pick(
                "This key asks for your PIN at every signature.",
                "此密钥每次签名都要输入 PIN 码。",
            )
            .to_owned(),
            String::new(),
            format!(
                "{}{}",
                self.pick("For: ", "证书主体："),
                quote(subject, SUBJECT_CHARS)
            ),
            self.token_line(token_label),
        ];
        self.finish(title, lines, None, ok.to_owned(), unlock)
    }

    /// Consent to store a certificate beside its key (`certificates.import`); `old`: what
    /// becomes of the certificate the key has now (a renewal for the same key).
    pub fn import_certificate(
        &self,
        origin: &str,
        token_label: &str,
        container: Option<&str>,
        cert: ShownCertificate<'_>,
        old: KeyCertificate,
        unlock: Unlock,
    ) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：导入证书",
                format!("{} 请求将一张证书导入您的 USB Key。", asker_zh(origin)),
                "导入证书(_I)",
            )
        } else {
            (
                "KeyPort: store a certificate",
                format!("{origin} asks to store a certificate on your token."),
                "Store certificate",
            )
        };
        let mut lines = vec![header, String::new()];
        lines.extend(self.certificate_lines(cert));
        lines.push(self.token_line(token_label));
        lines.extend(self.container_line(container));
        match old {
            KeyCertificate::None => {}
            KeyCertificate::KeptBeside => lines.push(
                self.pick(
                    "This key has a certificate already: it stays, and both are listed until \
                     you remove the old one (keyport certs remove).",
                    "该密钥已有证书：现有证书保留，两张证书都会列出，直到您删除旧证书\
                     （keyport certs remove）。",
                )
                .to_owned(),
            ),
            KeyCertificate::Replaced => lines.push(
                self.pick(
                    "The certificate this key has now is replaced.",
                    "该密钥现有的证书将被替换。",
                )
                .to_owned(),
            ),
        }
        self.finish(title, lines, None, ok.to_owned(), unlock)
    }

    /// Consent to remove one of a key's certificates (`keyport certs remove`: the old one after
    /// a renewal for the same key); `kept_until`: the notAfter of the certificate the key keeps.
    pub fn remove_certificate(
        &self,
        origin: &str,
        token_label: &str,
        cert: ShownCertificate<'_>,
        kept_until: &str,
        unlock: Unlock,
    ) -> Dialog {
        let (title, header, ok) = if self.zh() {
            (
                "KeyPort：删除证书",
                format!("{} 请求从您的 USB Key 中删除一张证书。", asker_zh(origin)),
                "删除证书(_D)",
            )
        } else {
            (
                "KeyPort: remove a certificate",
                format!("{origin} asks to remove a certificate from your token."),
                "Remove certificate",
            )
        };
        let mut lines = vec![header, String::new()];
        lines.extend(self.certificate_lines(cert));
        lines.extend([
            self.token_line(token_label),
            if self.zh() {
                format!(
                    "该密钥保留有效期至 {} 的证书；密钥本身不会被删除。",
                    quote(kept_until, LABEL_CHARS)
                )
            } else {
                format!(
                    "The key keeps its certificate valid until {}; the key itself is not removed.",
                    quote(kept_until, LABEL_CHARS)
                )
            },
        ]);
        self.finish(title, lines, None, ok.to_owned(), unlock)
    }

    /// A certificate's lines: subject, issuer, and validity and serial when given.
    fn certificate_lines(&self, cert: ShownCertificate<'_>) -> Vec<String> {
        let mut lines = vec![
            format!(
                "{}{}",
                self.pick("Certificate: ", "证书："),
                quote(cert.subject, SUBJECT_CHARS)
            ),
            format!(
                "{}{}",
                self.pick("Issued by: ", "颁发者："),
                quote(cert.issuer, NAME_CHARS)
            ),
        ];
        if let Some(until) = cert.valid_until {
            lines.push(format!(
                "{}{}",
                self.pick("Valid until: ", "有效期至："),
                quote(until, LABEL_CHARS)
            ));
        }
        if let Some(serial) = cert.serial {
            lines.push(format!(
                "{}{}",
                self.pick("Serial number: ", "序列号："),
                quote(serial, LABEL_CHARS)
            ));
        }
        lines
    }

    /// The warning for a wrong PIN and the token's PIN state, if there is anything to say.
    pub fn pin_warning(&self, state: PinState) -> Option<String> {
        let mut parts = Vec::new();
        if state.wrong_pin {
            parts.push(self.pick("Wrong PIN.", "PIN 码错误。"));
        }
        if state.final_try {
            parts.push(self.pick(
                "FINAL TRY: one more wrong PIN locks the token.",
                "仅剩最后一次机会：如再输错 PIN 码，USB Key 将被锁定。",
            ));
        } else if state.count_low {
            parts.push(self.pick("Few tries left.", "剩余尝试次数不多。"));
        }
        // Chinese sentences follow each other with no space after the full stop.
        (!parts.is_empty()).then(|| parts.join(self.pick(" ", "")))
    }

    /// What a request of the `keyport` command line shows in the origin's place, naming the
    /// command (`keys generate`, `certs import`).
    pub fn command_line_program(&self, command: &str) -> String {
        if self.zh() {
            format!("命令行程序 keyport {command}")
        } else {
            format!("keyport {command} (command line)")
        }
    }

    /// What a signature asked by `keyport sign` shows in the origin's place.
    pub fn command_line_origin(&self) -> &'static str {
        self.pick("keyport sign (command line)", "命令行程序 keyport sign")
    }

    fn pick<'s>(&self, en: &'s str, zh: &'s str) -> &'s str {
        if self.zh() {
            zh
        } else {
            en
        }
    }

    fn signer_line(&self, signer: &Signer<'_>) -> String {
        let holder = quote(signer.holder, NAME_CHARS);
        let issuer = quote(signer.issuer, NAME_CHARS);
        if self.zh() {
            format!("证书：{holder}（颁发者：{issuer}）")
        } else {
            format!("Certificate: {holder}, issued by {issuer}")
        }
    }

    /// "Documents: «a», «b», «c» and 22 more" (an item without a label shows as its number);
    /// `None` when no item has a label.
    fn batch_items_line(&self, labels: &[String], count: usize) -> Option<String> {
        if labels.iter().all(|l| l.trim().is_empty()) {
            return None;
        }
        let shown: Vec<String> = labels
            .iter()
            .take(BATCH_LABELS_SHOWN)
            .enumerate()
            .map(|(i, l)| {
                if l.trim().is_empty() {
                    format!("#{}", i + 1)
                } else {
                    quote(l, LABEL_CHARS)
                }
            })
            .collect();
        let more = count.saturating_sub(shown.len());
        Some(if self.zh() {
            let list = shown.join("、");
            if more > 0 {
                format!("文件：{list}等 {count} 份")
            } else {
                format!("文件：{list}")
            }
        } else {
            let list = shown.join(", ");
            if more > 0 {
                format!("Documents: {list} and {more} more")
            } else {
                format!("Documents: {list}")
            }
        })
    }

    fn token_line(&self, label: &str) -> String {
        format!(
            "{}{}",
            self.pick("Token: ", "USB Key："),
            quote(label, LABEL_CHARS)
        )
    }

    /// Chinese text quotes with “…”: `quote`'s «» become them. «» only ever come from `quote`,
    /// which keeps «» and “” out of the quoted text, so the swap cannot reach into it.
    fn quote_marks(&self, line: &str) -> String {
        if self.zh() {
            line.replace('«', "“").replace('»', "”")
        } else {
            line.to_owned()
        }
    }

    /// Adds what depends on how the token is unlocked, then the summary last (the first thing
    /// cut when the description is too long), and builds the dialog.
    fn finish(
        &self,
        title: &str,
        mut lines: Vec<String>,
        summary: Option<&str>,
        ok: String,
        unlock: Unlock,
    ) -> Dialog {
        let cancel = self.pick("Cancel", "取消(_C)").to_owned();
        let title = title.to_owned();
        for line in &mut lines {
            *line = self.quote_marks(line);
        }
        let summary_line = summary
            .filter(|s| !browser_bridge::text::is_blank(s))
            .map(|s| {
                format!(
                    "{}{}",
                    self.pick("Summary: ", "说明："),
                    quote(s, SUMMARY_CHARS)
                )
            });
        let summary_line = summary_line.map(|l| self.quote_marks(&l));
        match unlock {
            Unlock::Pin(state) => {
                lines.extend(summary_line);
                Dialog::Pin(PinDialog {
                    title,
                    description: lines.join("\n"),
                    // pinentry-tty adds an ASCII colon unless the prompt ends with one:
                    // "PIN 码：" would show as "PIN 码：:".
                    prompt: self.pick("PIN:", "PIN 码").to_owned(),
                    error: self.pin_warning(state),
                    ok,
                    cancel,
                })
            }
            Unlock::PinPad(state) => {
                lines.push(String::new());
                lines.push(if self.zh() {
                    format!(
                        "点击“{}”后，请在读卡器的密码键盘上输入 PIN 码。",
                        without_accelerator(&ok)
                    )
                } else {
                    format!("Enter your PIN on the reader's keypad after you choose {ok}.")
                });
                // The warning goes in the description alone: pinentry-tty also prints a
                // confirm dialog's SETERROR (it showed twice), and not every pinentry shows
                // SETERROR on a confirm dialog, so the description is the one sure place.
                lines.extend(self.pin_warning(state));
                lines.extend(summary_line);
                Dialog::Confirm(ConfirmDialog {
                    title,
                    description: lines.join("\n"),
                    error: None,
                    ok,
                    cancel,
                    not_ok: None,
                })
            }
            Unlock::LoggedIn => {
                lines.extend(summary_line);
                Dialog::Confirm(ConfirmDialog {
                    title,
                    description: lines.join("\n"),
                    error: None,
                    ok,
                    cancel,
                    not_ok: None,
                })
            }
        }
    }
}

/// Who asks, in a Chinese sentence: "网站 https://…" for a web origin, the command line's own
/// name (命令行程序 keyport …) as it is.
fn asker_zh(origin: &str) -> String {
    if origin.contains("://") {
        format!("网站 {origin}")
    } else {
        origin.to_owned()
    }
}

/// A button label as a sentence names it: "签署(_S)" → "签署", "_Sign" → "Sign".
fn without_accelerator(label: &str) -> String {
    let label = match label.rfind("(_") {
        Some(at) if label.ends_with(')') => &label[..at],
        _ => label,
    };
    label.replace('_', "")
}

/// An untrusted string (page, token or certificate text), put through the one cleaning of
/// untrusted text (`browser_bridge::text::clean`: no invisible characters, no line breaks),
/// cut, inside «guillemets» that it cannot close. Text blank after cleaning shows as «—», never
/// as an empty or invisible name.
fn quote(text: &str, max_chars: usize) -> String {
    let cleaned = browser_bridge::text::clean(text);
    let text = if browser_bridge::text::is_blank(&cleaned) {
        "—"
    } else {
        cleaned.trim()
    };
    let mut out = String::with_capacity(text.len().min(max_chars * 4) + 8);
    out.push('«');
    let mut count = 0;
    let mut chars = text
        .chars()
        .filter(|c| !is_bidi_control(*c))
        .map(|c| match c {
            '«' => '‹',
            '»' => '›',
            '“' => '‘',
            '”' => '’',
            c if c.is_control() => ' ',
            c => c,
        })
        .peekable();
    while let Some(c) = chars.next() {
        if count == max_chars {
            out.push('…');
            break;
        }
        out.push(c);
        count += 1;
        if count == max_chars && chars.peek().is_none() {
            break;
        }
    }
    out.push('»');
    out
}

/// Unicode bidirectional formatting characters, which can reorder how text is displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The first 16 hex digits of a digest, with `…` when there is more.
fn digest_prefix(digest: &[u8]) -> String {
    let shown = &digest[..digest.len().min(DIGEST_PREFIX_BYTES)];
    let mut prefix = hex::encode(shown);
    if digest.len() > DIGEST_PREFIX_BYTES {
        prefix.push('…');
    }
    prefix
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails by panicking
mod tests {
    use super::*;

    const ORIGIN: &str = "https://portal.example";
    const DIGEST: [u8; 32] = [
        0x3f, 0x2a, 0x9c, 0x0d, 0x11, 0xaa, 0x22, 0xbb, 0xcc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
    ];

    fn signer() -> Signer<'static> {
        Signer {
            origin: ORIGIN,
            holder: "Jane Doe",
            issuer: "KeyPort Test CA",
            token_label: "SoftHSM token",
        }
    }

    fn document() -> Document<'static> {
        Document {
            title: "Loan contract 2026-114",
            summary: Some("Loan of 10 000 EUR over 5 years"),
            digest: &DIGEST,
        }
    }

    fn pin(dialog: Dialog) -> PinDialog {
        match dialog {
            Dialog::Pin(dialog) => dialog,
            other => panic!("not a PIN dialog: {other:?}"),
        }
    }

    fn confirm(dialog: Dialog) -> ConfirmDialog {
        match dialog {
            Dialog::Confirm(dialog) => dialog,
            other => panic!("not a confirm dialog: {other:?}"),
        }
    }

    fn assert_has(text: &str, parts: &[&str]) {
        for part in parts {
            assert!(text.contains(part), "{part:?} missing from {text:?}");
        }
    }

    #[test]
    fn chinese_buttons_have_letter_keys_and_sentences_name_them_plainly() {
        // pinentry-tty takes a label's first character as its key unless `_` marks one: without
        // a mark "签署 3 份" would be on the key 3.
        let zh = Texts::new(Language::ZhCn);
        let batch = pin(zh.sign_batch(
            &signer(),
            &document(),
            3,
            &[],
            Unlock::Pin(PinState::default()),
        ));
        assert_eq!(batch.ok, "签署 3 份(_S)");
        assert_eq!(batch.cancel, "取消(_C)");
        assert_eq!(without_accelerator(&batch.ok), "签署 3 份");
        assert_eq!(without_accelerator("_Sign"), "Sign");
        assert_eq!(without_accelerator("Allow _once"), "Allow once");
        assert_eq!(without_accelerator("(_x"), "(x");
    }

    #[test]
    fn the_command_line_is_not_called_a_website() {
        let zh = Texts::new(Language::ZhCn);
        let cli = zh.command_line_origin();
        let mut s = signer();
        s.origin = cli;
        let dialog = pin(zh.sign(&s, &document(), Unlock::Pin(PinState::default())));
        assert!(
            dialog
                .description
                .starts_with("命令行程序 keyport sign 请求您签署一份文件。"),
            "{}",
            dialog.description
        );
        let web = pin(zh.sign(&signer(), &document(), Unlock::Pin(PinState::default())));
        assert!(web
            .description
            .starts_with("网站 https://portal.example 请求"));
    }

    #[test]
    fn language_from_config_and_locale() {
        assert_eq!(Language::from_config(Some("zh-CN")), Language::ZhCn);
        assert_eq!(Language::from_config(Some("zh_CN.UTF-8")), Language::ZhCn);
        assert_eq!(Language::from_config(Some("ZH")), Language::ZhCn);
        assert_eq!(Language::from_config(Some("en")), Language::En);
        assert_eq!(Language::from_config(Some("de_DE")), Language::En);
        assert_eq!(
            Language::from_locale(None, Some("zh_CN.UTF-8"), Some("en_US.UTF-8")),
            Language::ZhCn
        );
        assert_eq!(
            Language::from_locale(Some("C"), Some("zh_CN.UTF-8"), None),
            Language::En
        );
        assert_eq!(
            Language::from_locale(Some(""), None, Some("zh_TW.UTF-8")),
            Language::ZhCn
        );
        assert_eq!(Language::from_locale(None, None, None), Language::En);
    }

    #[test]
    fn sign_with_pin_in_english() {
        let dialog = pin(Texts::new(Language::En).sign(
            &signer(),
            &document(),
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &dialog.description,
            &[
                "https://portal.example asks you to sign a document.",
                "«Loan contract 2026-114»",
                "«Jane Doe», issued by «KeyPort Test CA»",
                "3f2a9c0d11aa22bb…",
                "«SoftHSM token»",
                "«Loan of 10 000 EUR over 5 years»",
            ],
        );
        assert!(!dialog.description.contains("3f2a9c0d11aa22bbcc"));
        assert_eq!(dialog.prompt, "PIN:");
        assert_eq!(dialog.ok, "Sign");
        assert_eq!(dialog.error, None);
    }

    #[test]
    fn sign_with_pin_in_chinese() {
        let dialog = pin(Texts::new(Language::ZhCn).sign(
            &signer(),
            &document(),
            Unlock::Pin(PinState {
                wrong_pin: true,
                count_low: true,
                final_try: false,
            }),
        ));
        assert_has(
            &dialog.description,
            &[
                "网站 https://portal.example 请求您签署一份文件。",
                "文件：“Loan contract 2026-114”",
                "证书：“Jane Doe”（颁发者：“KeyPort Test CA”）",
                "哈希值：3f2a9c0d11aa22bb…",
                "USB Key：“SoftHSM token”",
            ],
        );
        assert_eq!(
            dialog.error.as_deref(),
            Some("PIN 码错误。剩余尝试次数不多。")
        );
        assert_eq!(dialog.prompt, "PIN 码");
        assert_eq!(dialog.ok, "签署(_S)");
        assert_eq!(dialog.cancel, "取消(_C)");
    }

    #[test]
    fn warnings_for_wrong_pin_few_tries_and_final_try() {
        let en = Texts::new(Language::En);
        assert_eq!(en.pin_warning(PinState::default()), None);
        let wrong_final = PinState {
            wrong_pin: true,
            count_low: true,
            final_try: true,
        };
        assert_eq!(
            en.pin_warning(wrong_final).as_deref(),
            Some("Wrong PIN. FINAL TRY: one more wrong PIN locks the token.")
        );
        let low = PinState {
            count_low: true,
            ..PinState::default()
        };
        assert_eq!(en.pin_warning(low).as_deref(), Some("Few tries left."));
        let zh = Texts::new(Language::ZhCn);
        assert_eq!(
            zh.pin_warning(wrong_final).as_deref(),
            Some("PIN 码错误。仅剩最后一次机会：如再输错 PIN 码，USB Key 将被锁定。")
        );
    }

    #[test]
    fn pin_pad_tokens_get_a_confirm_dialog_with_the_reader_instruction() {
        let final_try = PinState {
            final_try: true,
            ..PinState::default()
        };
        let en = confirm(Texts::new(Language::En).sign(
            &signer(),
            &document(),
            Unlock::PinPad(final_try),
        ));
        assert_has(
            &en.description,
            &[
                "Enter your PIN on the reader's keypad after you choose Sign.",
                "FINAL TRY: one more wrong PIN locks the token.",
                "«Loan contract 2026-114»",
            ],
        );
        assert_eq!(en.not_ok, None);
        // Shown once: in the description, not again as the dialog's error.
        assert_eq!(en.error, None);
        let zh = confirm(Texts::new(Language::ZhCn).sign(
            &signer(),
            &document(),
            Unlock::PinPad(PinState::default()),
        ));
        assert_has(
            &zh.description,
            &["点击“签署”后，请在读卡器的密码键盘上输入 PIN 码。"],
        );
    }

    #[test]
    fn a_per_signature_key_asks_per_document_and_says_so_first() {
        let first = pin(Texts::new(Language::En).sign_batch_item(
            &signer(),
            &document(),
            BatchItem {
                label: Some("Invoice 17"),
                index: 0,
                count: 25,
                announce: true,
            },
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &first.description,
            &[
                "asks you to sign 25 documents.",
                "This key asks for your PIN for each of the 25 documents.",
                "Batch: «Loan contract 2026-114»",
                "Document 1 of 25: «Invoice 17»",
                "3f2a9c0d11aa22bb",
            ],
        );
        assert_eq!(first.ok, "Sign document 1");
        let second = pin(Texts::new(Language::En).sign_batch_item(
            &signer(),
            &document(),
            BatchItem {
                label: None,
                index: 1,
                count: 25,
                announce: false,
            },
            Unlock::Pin(PinState::default()),
        ));
        assert!(!second.description.contains("for each of"));
        assert_has(&second.description, &["Document 2 of 25\n"]);
        let zh = pin(Texts::new(Language::ZhCn).sign_batch_item(
            &signer(),
            &document(),
            BatchItem {
                label: Some("发票 17"),
                index: 0,
                count: 3,
                announce: true,
            },
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &zh.description,
            &[
                "此密钥每签一份文件都要输入一次 PIN 码，共 3 份。",
                "批次：“Loan contract 2026-114”",
                "第 1 份（共 3 份）：“发票 17”",
            ],
        );
        assert_eq!(zh.ok, "签署第 1 份(_S)");
    }

    #[test]
    fn logged_in_tokens_still_get_a_consent_dialog() {
        let dialog =
            confirm(Texts::new(Language::En).sign(&signer(), &document(), Unlock::LoggedIn));
        assert_has(
            &dialog.description,
            &["«Loan contract 2026-114»", "3f2a9c0d11aa22bb"],
        );
        assert!(!dialog.description.contains("PIN"));
    }

    #[test]
    fn batch_shows_the_count_the_batch_title_and_the_items_labels() {
        let labels: Vec<String> = ["Loan contract", "", "Insurance «form»", "Annex D"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let en = pin(Texts::new(Language::En).sign_batch(
            &signer(),
            &document(),
            25,
            &labels,
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &en.description,
            &[
                "asks you to sign 25 documents.",
                "Batch: «Loan contract 2026-114»",
                "Documents: «Loan contract», #2, «Insurance ‹form›» and 22 more",
                "Digest: 3f2a9c0d11aa22bb… (first of 25)",
                "«Jane Doe»",
            ],
        );
        assert!(!en.description.contains("First document"));
        assert!(!en.description.contains("Annex D"), "three labels at most");
        assert_eq!(en.ok, "Sign 25");
        let zh = pin(Texts::new(Language::ZhCn).sign_batch(
            &signer(),
            &document(),
            3,
            &labels[..3],
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &zh.description,
            &[
                "请求您签署 3 份文件。",
                "批次：“Loan contract 2026-114”",
                "文件：“Loan contract”、#2、“Insurance ‹form›”\n",
                "哈希值：3f2a9c0d11aa22bb…（第一份，共 3 份）",
            ],
        );
        // No labels at all: no list.
        let en = pin(Texts::new(Language::En).sign_batch(
            &signer(),
            &document(),
            2,
            &[String::new(), String::new()],
            Unlock::Pin(PinState::default()),
        ));
        assert!(!en.description.contains("Documents:"), "{}", en.description);
    }

    /// Issue 14, snag 11: the Chinese texts read as Chinese: “” quotes (a title's own “” cannot
    /// close them), no double colon after the prompt, no space between sentences, and every
    /// access button on its own key, none of them pinentry-tty's No.
    #[test]
    fn chinese_dialogs_read_naturally() {
        let zh = Texts::new(Language::ZhCn);
        let dialog = pin(zh.sign(
            &Signer {
                holder: "张伟",
                ..signer()
            },
            &Document {
                title: "借款合同”（伪造）“",
                ..document()
            },
            Unlock::Pin(PinState {
                wrong_pin: true,
                count_low: true,
                ..PinState::default()
            }),
        ));
        assert!(
            dialog.description.contains("文件：“借款合同’（伪造）‘”"),
            "{}",
            dialog.description
        );
        assert!(dialog
            .description
            .contains("证书：“张伟”（颁发者：“KeyPort Test CA”）"));
        assert!(!dialog.description.contains('«') && !dialog.description.contains('»'));
        assert_eq!(dialog.prompt, "PIN 码");
        assert_eq!(
            dialog.error.as_deref(),
            Some("PIN 码错误。剩余尝试次数不多。")
        );
        let login = pin(zh.login(&signer(), Unlock::Pin(PinState::default())));
        assert!(
            login
                .description
                .starts_with("以“Jane Doe”的身份登录网站 https://portal.example？"),
            "{}",
            login.description
        );
        let access = zh.origin_approval("https://portal.example");
        let keys: Vec<&str> = [
            access.ok.as_str(),
            access.not_ok.as_deref().unwrap_or_default(),
            access.cancel.as_str(),
        ]
        .iter()
        .map(|label| label.split("(_").nth(1).unwrap_or_default())
        .collect();
        assert_eq!(keys, ["O)", "A)", "D)"]);
        assert_eq!(access.not_ok.as_deref(), Some("始终允许(_A)"));
        // English: three different keys too (o, a, d), not two on A.
        let en = Texts::new(Language::En).origin_approval("https://portal.example");
        assert_eq!(
            (en.ok.as_str(), en.not_ok.as_deref(), en.cancel.as_str()),
            ("Allow _once", Some("Allow _always"), "_Deny")
        );
    }

    #[test]
    fn login_names_the_origin_and_the_holder() {
        let en = pin(Texts::new(Language::En).login(&signer(), Unlock::Pin(PinState::default())));
        assert_has(
            &en.description,
            &[
                "Log in to https://portal.example as «Jane Doe»?",
                "«SoftHSM token»",
            ],
        );
        assert_eq!(en.ok, "Log in");
        let zh = pin(Texts::new(Language::ZhCn).login(&signer(), Unlock::Pin(PinState::default())));
        assert_has(
            &zh.description,
            &["以“Jane Doe”的身份登录网站 https://portal.example？"],
        );
        assert_eq!(zh.ok, "登录(_L)");
    }

    #[test]
    fn origin_approval_buttons_map_to_decisions() {
        for language in [Language::En, Language::ZhCn] {
            let dialog = Texts::new(language).origin_approval(ORIGIN);
            assert!(dialog.description.contains(ORIGIN));
            assert!(dialog.not_ok.is_some());
        }
        let en = Texts::new(Language::En).origin_approval(ORIGIN);
        assert!(en
            .description
            .starts_with("Allow https://portal.example to use your certificates?"));
        assert_eq!(
            (en.ok.as_str(), en.not_ok.as_deref(), en.cancel.as_str()),
            ("Allow _once", Some("Allow _always"), "_Deny")
        );
        assert_eq!(
            OriginDecision::from_answer(Ok(Choice::Ok)).unwrap(),
            OriginDecision::AllowOnce
        );
        assert_eq!(
            OriginDecision::from_answer(Ok(Choice::NotOk)).unwrap(),
            OriginDecision::AllowAlways
        );
        assert_eq!(
            OriginDecision::from_answer(Err(DialogError::Cancelled)).unwrap(),
            OriginDecision::Deny
        );
        assert!(OriginDecision::from_answer(Err(DialogError::Timeout)).is_err());
    }

    #[test]
    fn key_generation_and_import_texts() {
        let en = confirm(Texts::new(Language::En).generate_key(
            ORIGIN,
            "SoftHSM token",
            None,
            "EC-P256",
            "CN=Jane Doe,O=Example",
            Unlock::LoggedIn,
        ));
        assert_has(
            &en.description,
            &[
                "https://portal.example asks to create a new key on your token.",
                "«EC-P256»",
                "«CN=Jane Doe,O=Example»",
            ],
        );
        let zh = pin(Texts::new(Language::ZhCn).import_certificate(
            ORIGIN,
            "SoftHSM token",
            None,
            ShownCertificate {
                subject: "CN=Jane Doe",
                issuer: "CN=KeyPort Test CA",
                ..Default::default()
            },
            KeyCertificate::Replaced,
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &zh.description,
            &[
                "网站 https://portal.example 请求将一张证书导入您的 USB Key。",
                "“CN=Jane Doe”",
                "颁发者：“CN=KeyPort Test CA”",
                "该密钥现有的证书将被替换。",
            ],
        );
        assert_eq!(zh.title, "KeyPort：导入证书");
        let zh = confirm(Texts::new(Language::ZhCn).generate_key(
            ORIGIN,
            "SoftHSM token",
            None,
            "EC-P256",
            "CN=张伟,C=CN",
            Unlock::LoggedIn,
        ));
        assert_eq!(zh.title, "KeyPort：生成密钥对");
        assert_eq!(zh.ok, "生成密钥对(_G)");
        assert_has(
            &zh.description,
            &["网站 https://portal.example 请求在您的 USB Key 中生成新的密钥对。"],
        );
        let en = pin(Texts::new(Language::En).sign_new_key_request(
            ORIGIN,
            "SoftHSM token",
            "CN=Jane Doe",
            Unlock::Pin(PinState::default()),
        ));
        assert_eq!(en.title, "KeyPort: sign the certificate request");
        assert_has(
            &en.description,
            &[
                "https://portal.example asks your new key to sign its certificate request.",
                "This key asks for your PIN at every signature.",
                "«CN=Jane Doe»",
            ],
        );
        let zh = pin(Texts::new(Language::ZhCn).sign_new_key_request(
            ORIGIN,
            "SoftHSM token",
            "CN=张伟",
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &zh.description,
            &[
                "网站 https://portal.example 请求用刚生成的密钥签署证书请求。",
                "此密钥每次签名都要输入 PIN 码。",
                "证书主体：“CN=张伟”",
            ],
        );
        let cli = Texts::new(Language::ZhCn);
        let zh = confirm(cli.generate_key(
            &cli.command_line_program("keys generate"),
            "SoftHSM token",
            None,
            "EC-P256",
            "CN=张伟,C=CN",
            Unlock::LoggedIn,
        ));
        assert_has(
            &zh.description,
            &["命令行程序 keyport keys generate 请求在您的 USB Key 中生成新的密钥对。"],
        );
        // An SKF key's container is named in both languages.
        let zh = pin(Texts::new(Language::ZhCn).generate_key(
            ORIGIN,
            "KeyPort SM2 Key",
            Some("张伟 2026"),
            "SM2",
            "CN=张伟,C=CN",
            Unlock::Pin(PinState::default()),
        ));
        assert_has(&zh.description, &["密钥类型：“SM2”", "容器：“张伟 2026”"]);
        let en = pin(Texts::new(Language::En).import_certificate(
            ORIGIN,
            "KeyPort SM2 Key",
            Some("KeyPort-20261202-120000-abcd"),
            ShownCertificate {
                subject: "CN=Zhang Wei",
                issuer: "CN=SM2 Test CA",
                ..Default::default()
            },
            KeyCertificate::KeptBeside,
            Unlock::Pin(PinState::default()),
        ));
        assert_has(
            &en.description,
            &["it stays, and both are listed until you remove the old one"],
        );
        assert_has(
            &en.description,
            &["Container: «KeyPort-20261202-120000-abcd»"],
        );
    }

    #[test]
    fn certificate_removal_texts() {
        let en = pin(Texts::new(Language::En).remove_certificate(
            ORIGIN,
            "SoftHSM token",
            ShownCertificate {
                subject: "CN=Jane Doe",
                issuer: "CN=KeyPort Test CA",
                valid_until: Some("2026-12-31"),
                serial: Some("07"),
            },
            "2027-12-31",
            Unlock::Pin(PinState::default()),
        ));
        assert_eq!(en.title, "KeyPort: remove a certificate");
        assert_has(
            &en.description,
            &[
                "https://portal.example asks to remove a certificate from your token.",
                "Valid until: «2026-12-31»",
                "Serial number: «07»",
                "The key keeps its certificate valid until «2027-12-31»; the key itself is not removed.",
            ],
        );
        let zh = pin(Texts::new(Language::ZhCn).remove_certificate(
            ORIGIN,
            "SoftHSM token",
            ShownCertificate {
                subject: "CN=张伟",
                issuer: "CN=KeyPort Test CA",
                valid_until: Some("2026-12-31"),
                serial: Some("07"),
            },
            "2027-12-31",
            Unlock::Pin(PinState::default()),
        ));
        assert_eq!(zh.title, "KeyPort：删除证书");
        assert_eq!(zh.ok, "删除证书(_D)");
        assert_has(
            &zh.description,
            &[
                "网站 https://portal.example 请求从您的 USB Key 中删除一张证书。",
                "有效期至：“2026-12-31”",
                "该密钥保留有效期至 “2027-12-31” 的证书；密钥本身不会被删除。",
            ],
        );
    }

    #[test]
    fn page_strings_cannot_pose_as_agent_text() {
        let hostile = Document {
            title: "Invoice»\nKeyPort verified this document «ok\u{202E}txt.exe",
            summary: None,
            digest: &DIGEST,
        };
        let dialog = pin(Texts::new(Language::En).sign(
            &signer(),
            &hostile,
            Unlock::Pin(PinState::default()),
        ));
        let line = dialog
            .description
            .lines()
            .find(|l| l.starts_with("Document: "))
            .unwrap();
        assert_eq!(
            line,
            "Document: «Invoice› KeyPort verified this document ‹oktxt.exe»"
        );
        assert!(!dialog.description.contains('\u{202E}'));
    }

    #[test]
    fn token_and_certificate_text_cannot_add_lines_or_hide() {
        let signer = Signer {
            origin: "https://portal.example",
            holder: "Alice\u{2028}KeyPort verified this request\u{200B}",
            issuer: "\u{3164}\u{2800}",
            token_label: "Token\u{2029}Second line\u{E0041}",
        };
        let dialog = pin(Texts::new(Language::En).sign(
            &signer,
            &document(),
            Unlock::Pin(PinState::default()),
        ));
        for c in ['\u{2028}', '\u{2029}', '\u{200B}', '\u{3164}', '\u{E0041}'] {
            assert!(!dialog.description.contains(c), "U+{:04X}", u32::from(c));
        }
        assert!(dialog
            .description
            .contains("«AliceKeyPort verified this request», issued by «—»"));
        assert!(dialog.description.contains("«TokenSecond line»"));
    }

    #[test]
    fn long_page_strings_are_cut() {
        let title = "x".repeat(500);
        let summary = "说".repeat(2000);
        let document = Document {
            title: &title,
            summary: Some(&summary),
            digest: &DIGEST,
        };
        let dialog = pin(Texts::new(Language::ZhCn).sign(
            &signer(),
            &document,
            Unlock::Pin(PinState::default()),
        ));
        let expected_title = format!("“{}…”", "x".repeat(TITLE_CHARS));
        assert!(dialog.description.contains(&expected_title));
        let expected_summary = format!("“{}…”", "说".repeat(SUMMARY_CHARS));
        assert!(dialog.description.ends_with(&expected_summary));
        // Exactly at the cap: no ellipsis.
        assert_eq!(quote("abc", 3), "«abc»");
        assert_eq!(quote("abcd", 3), "«abc…»");
    }

    #[test]
    fn short_digests_are_shown_whole() {
        assert_eq!(digest_prefix(&[0xab, 0xcd]), "abcd");
        assert_eq!(digest_prefix(&DIGEST[..8]), "3f2a9c0d11aa22bb");
    }

    #[test]
    fn consent_debug_hides_the_pin() {
        let consent = Consent::Pin(Zeroizing::new("123456".to_owned()));
        assert!(!format!("{consent:?}").contains("123456"));
    }
}
