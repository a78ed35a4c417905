//! Consent and PIN, decided by the caller in one loop it reads top to bottom: ask (consent and
//! PIN in one dialog) → sign on the token with that answer → on a wrong PIN ask again with the
//! token's warning, on a login the answer could not serve (the next signature of a key that asks
//! for the PIN per signature) ask again, on a lock or anything else stop. The token layer never
//! asks anyone and never retries a PIN; this module holds the small pieces both loops (the
//! service's and `keyport sign`'s) share.

use std::sync::Arc;

use crate::backend::{Credential, LoginState, PinStatus, TokenError};

use crate::dialog::{Consent, Dialog, PinState, Texts, Unlock};

/// Which dialog of a request is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole request (one document, or a batch under one PIN).
    All,
    /// Item `index` (from 0) of `count`, for a key that asks for its PIN per signature;
    /// `announce`: the first such dialog of the request, which says so.
    Item {
        index: usize,
        count: usize,
        announce: bool,
    },
}

/// Builds the consent dialog for one operation, given how the token is unlocked and which part
/// of the request it is for.
pub type DialogBuilder = Arc<dyn Fn(&Texts, Unlock, Scope) -> Dialog + Send + Sync>;

/// What to do after a token job stopped with `error`, its signatures kept.
#[derive(Debug)]
pub enum Next {
    /// Ask the user (this way) and send the rest again.
    Ask(Unlock),
    /// Stop the request with this error.
    Stop(TokenError),
}

/// The one decision after a job that did not finish: a wrong PIN asks again with the token's
/// warning (the same way the last question asked: PIN field or PIN pad); a login the answer
/// could not serve asks for it; anything else (a lock included) ends the request.
pub fn after(error: TokenError, last: Option<Unlock>) -> Next {
    use TokenError as E;
    match error {
        E::LoginRequired { pin, pin_pad, .. } => {
            let state = pin_state(pin, false);
            Next::Ask(if pin_pad {
                Unlock::PinPad(state)
            } else {
                Unlock::Pin(state)
            })
        }
        E::PinIncorrect {
            count_low,
            final_try,
        } => {
            let state = PinState {
                wrong_pin: true,
                count_low,
                final_try,
            };
            Next::Ask(match last {
                Some(Unlock::PinPad(_)) => Unlock::PinPad(state),
                _ => Unlock::Pin(state),
            })
        }
        other => Next::Stop(other),
    }
}

/// The first question, from the token's state before any work (`None`: no dialog needed now).
pub fn first_question(state: LoginState, consent_given: bool) -> Option<Unlock> {
    use LoginState as L;
    match state {
        L::NeedsPin(st) => Some(Unlock::Pin(pin_state(st, false))),
        L::ProtectedPath => Some(Unlock::PinPad(PinState::default())),
        L::LoggedIn if consent_given => None,
        L::LoggedIn => Some(Unlock::LoggedIn),
        // The caller stops before asking; no dialog.
        L::Locked => None,
    }
}

/// The job's credential from the user's answer to a dialog shown as `unlock`.
pub fn credential(consent: Consent, unlock: Unlock) -> Credential {
    match (consent, unlock) {
        (Consent::Pin(pin), _) => Credential::Pin(pin),
        (Consent::Confirmed, Unlock::PinPad(_)) => Credential::PinPad,
        (Consent::Confirmed, _) => Credential::None,
    }
}

fn pin_state(st: PinStatus, wrong_pin: bool) -> PinState {
    PinState {
        wrong_pin,
        count_low: st.count_low,
        final_try: st.final_try,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    #[test]
    fn a_wrong_pin_asks_again_the_same_way_with_the_warning() {
        let wrong = || TokenError::PinIncorrect {
            count_low: true,
            final_try: false,
        };
        let warned = PinState {
            wrong_pin: true,
            count_low: true,
            final_try: false,
        };
        assert!(matches!(
            after(wrong(), Some(Unlock::Pin(PinState::default()))),
            Next::Ask(Unlock::Pin(s)) if s == warned
        ));
        assert!(matches!(
            after(wrong(), Some(Unlock::PinPad(PinState::default()))),
            Next::Ask(Unlock::PinPad(s)) if s == warned
        ));
    }

    #[test]
    fn a_lock_or_a_token_error_stops() {
        assert!(matches!(
            after(TokenError::PinLocked, None),
            Next::Stop(TokenError::PinLocked)
        ));
        assert!(matches!(
            after(TokenError::CancelledOnReader, None),
            Next::Stop(TokenError::CancelledOnReader)
        ));
    }

    #[test]
    fn a_confirmation_is_a_pin_pad_login_only_for_a_pin_pad_dialog() {
        assert!(matches!(
            credential(Consent::Confirmed, Unlock::PinPad(PinState::default())),
            Credential::PinPad
        ));
        assert!(matches!(
            credential(Consent::Confirmed, Unlock::LoggedIn),
            Credential::None
        ));
        assert!(matches!(
            credential(
                Consent::Pin(Zeroizing::new("123456".into())),
                Unlock::Pin(PinState::default())
            ),
            Credential::Pin(_)
        ));
    }
}
