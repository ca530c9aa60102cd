//! Usernames: one identity however it is typed, and no look-alikes.
//!
//! An account's **identity key** is its username under NFKC, Unicode default
//! case folding and NFKC again (Unicode's `NFKC_Casefold` recipe): fullwidth
//! `ａｄｍｉｎ`, `ADMIN` and `admin` are one account, and `blocked_users =
//! ["blockme"]` blocks `BlockMe`. The key is what the store keeps as
//! `username` (unique) and what login, registration and the blocklist
//! compare. The form as typed is kept for display: it becomes the nickname
//! when none is given.
//!
//! What a username may contain, on the key: 3-32 letters, digits, `_`, `-`,
//! `.` or `@`, and its letters from one script — or one of the combinations
//! Unicode's "highly restrictive" profile (UTS #39) allows, Latin with
//! Han + Hiragana + Katakana, Han + Bopomofo or Han + Hangul — so `pаypal`
//! with a Cyrillic `а` is refused rather than shown beside `paypal`. Invisible
//! and direction-changing characters (bidi controls such as U+202E, zero-width
//! joiners, the BOM) are refused in usernames and nicknames alike.
//!
//! Look-alikes within one script — `admın` with a dotless ı, `ᴀdmin` with a
//! small capital, `victirn` beside `victim` — pass all of that. So each
//! account also has a **skeleton** ([`skeleton_key`]): UTS #39's skeleton of
//! its identity key (each character mapped to the one it is confusable
//! with), keyed again. The store keeps skeletons unique: a username whose
//! skeleton an account already has is taken, as the name itself would be.
//! Accounts made before skeletons were kept get theirs at start, the first
//! of any look-alike pair among them keeping it.

use unicode_normalization::UnicodeNormalization;
use unicode_script::{Script, UnicodeScript};
use unicode_security::GeneralSecurityProfile;

use crate::{store::NewUser, vocab::is_invisible};

/// The longest username a client may send, in bytes, as typed (before
/// normalisation: 32 letters typed decomposed take far more than 32 code
/// points). Registration and login hold to the same bound, so no account
/// has a name its owner cannot log in with.
pub const MAX_TYPED_BYTES: usize = 256;

/// A validated username: its identity key and the form it was typed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    key: String,
    display: String,
}

impl Username {
    /// Validates `raw`; the error is a sentence for the client.
    pub fn parse(raw: &str) -> Result<Username, String> {
        if raw.len() > MAX_TYPED_BYTES {
            return Err(format!("username must be at most {MAX_TYPED_BYTES} bytes as typed"));
        }
        if let Some(c) = raw.chars().find(|&c| is_invisible(c)) {
            return Err(format!(
                "username must not contain invisible or direction-changing characters (U+{:04X})",
                u32::from(c)
            ));
        }
        let key = identity_key(raw);
        let well_formed = (3..=32).contains(&key.chars().count())
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'));
        if !well_formed {
            return Err("username must be 3-32 letters, digits, '_', '-', '.' or '@'".into());
        }
        if !single_script(&key) {
            return Err("username must not mix letters of different scripts".into());
        }
        // Letters UTS #39 keeps out of identifiers as obsolete, technical or
        // uncommon (small capitals such as `ᴀ`): look-alikes the skeleton
        // does not map. Scripts of limited use (Cherokee, Yi, N'Ko, …) are
        // living scripts, and allowed.
        if let Some(c) = key.chars().find(|&c| c.is_alphanumeric() && !usable_letter(c)) {
            return Err(format!(
                "username must not contain the letter {c} (U+{:04X})",
                u32::from(c)
            ));
        }
        Ok(Username {
            key,
            display: raw.to_owned(),
        })
    }

    /// The identity key: what the store keeps and compares.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The username as typed.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The key no two accounts may share: see [`skeleton_key`].
    pub fn skeleton(&self) -> String {
        skeleton_key(&self.key)
    }

    /// The account to store under this name.
    pub fn account(&self, nickname: &str, password_hash: String, created_at_ms: i64) -> NewUser {
        NewUser {
            username: self.key.clone(),
            skeleton: self.skeleton(),
            nickname: nickname.to_owned(),
            password_hash,
            created_at_ms,
        }
    }
}

/// The skeleton of a username: UTS #39's skeleton (NFD, each character
/// replaced by the prototype it is confusable with, NFD) of its
/// [`identity_key`], keyed again, since prototypes may be capitals. Two
/// usernames with one skeleton look alike. (Of an identity key, or of a
/// name stored before usernames were normalised: the same either way.)
pub fn skeleton_key(name: &str) -> String {
    let skeleton: String = unicode_security::confusable_detection::skeleton(&identity_key(name)).collect();
    identity_key(&skeleton)
}

/// The identity key of any string (NFKC, case fold, NFKC), valid or not:
/// login looks accounts up by it without telling which names are well formed.
pub fn identity_key(raw: &str) -> String {
    // `İ` (Turkish) folds to `i` and a combining dot, which no username may
    // hold: `İstanbul` was refused as malformed. `i` with that dot (İ's
    // full fold, and what JavaScript's `toLowerCase` gives) is `i` here,
    // as the Turkic folding has it.
    let composed: String = raw.nfkc().collect();
    let folded = caseless::default_case_fold_str(&composed).replace("i\u{307}", "i");
    folded.nfkc().collect()
}

/// Checks display text (a nickname): no control, invisible or
/// direction-changing character.
pub fn check_display_text(text: &str) -> Result<(), String> {
    let chars: Vec<char> = text.chars().collect();
    let refused = (0..chars.len()).find(|&i| {
        let c = chars[i];
        (c.is_control() || is_invisible(c)) && !emoji_joiner(&chars, i)
    });
    match refused.map(|i| chars[i]) {
        Some(c) => Err(format!(
            "nickname must not contain control, invisible or direction-changing characters (U+{:04X})",
            u32::from(c)
        )),
        None => Ok(()),
    }
}

/// Whether `chars[i]`, invisible itself, is part of an emoji a phone's
/// keyboard writes (`❤️`, `1️⃣`, `👩‍💻`, `🏳️‍🌈`): a variation selector
/// 16 (or 15, text style) after a pictograph or keycap base, the tags of
/// a subdivision flag after 🏴, or a zero-width joiner between
/// two pictographs. Nicknames refused them, and README's own example.
fn emoji_joiner(chars: &[char], i: usize) -> bool {
    let before = i.checked_sub(1).map(|j| chars[j]);
    let after = chars.get(i + 1).copied();
    match chars[i] {
        // Emoji presentation, or text presentation (`☺︎`).
        '\u{FE0E}' | '\u{FE0F}' => before.is_some_and(|b| pictograph(b) || matches!(b, '0'..='9' | '#' | '*')),
        // The tags of a subdivision's flag (England's: 🏴 and `gbeng`, then
        // the cancel tag).
        '\u{E0020}'..='\u{E007F}' => {
            before.is_some_and(|b| b == '\u{1F3F4}' || ('\u{E0020}'..='\u{E007E}').contains(&b))
        }
        '\u{200D}' => {
            // A selector may sit between the pictograph and the joiner.
            let base = match before {
                Some('\u{FE0F}') => i.checked_sub(2).map(|j| chars[j]),
                b => b,
            };
            base.is_some_and(pictograph) && after.is_some_and(pictograph)
        }
        _ => false,
    }
}

/// Pictographs, roughly as Unicode's `Extended_Pictographic`: the blocks
/// where emoji live (a joiner or selector next to one is how they combine).
fn pictograph(c: char) -> bool {
    matches!(u32::from(c),
        0x00A9 | 0x00AE | 0x203C | 0x2049 | 0x2122 | 0x2139
        | 0x2190..=0x21FF | 0x2300..=0x23FF | 0x25A0..=0x27BF | 0x2900..=0x297F
        | 0x2B00..=0x2BFF | 0x3030 | 0x303D | 0x3297 | 0x3299 | 0x1F000..=0x1FAFF)
}

/// Whether UTS #39 lets `c` into identifiers: recommended, an inclusion,
/// or of a script in limited (but living) use.
fn usable_letter(c: char) -> bool {
    use unicode_security::general_security_profile::IdentifierType as T;
    c.identifier_allowed() || matches!(c.identifier_type(), Some(T::Limited_Use))
}

/// Whether the letters of `s` come from one script, or from one of the
/// combinations UTS #39's "highly restrictive" level allows.
fn single_script(s: &str) -> bool {
    let mut scripts: Vec<Script> = Vec::with_capacity(2);
    for c in s.chars() {
        let script = c.script();
        if !matches!(script, Script::Common | Script::Inherited) && !scripts.contains(&script) {
            scripts.push(script);
        }
    }
    if scripts.len() <= 1 {
        return true;
    }
    const ALLOWED: [&[Script]; 3] = [
        &[Script::Latin, Script::Han, Script::Hiragana, Script::Katakana],
        &[Script::Latin, Script::Han, Script::Bopomofo],
        &[Script::Latin, Script::Han, Script::Hangul],
    ];
    ALLOWED.iter().any(|set| scripts.iter().all(|s| set.contains(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 Hangul syllables typed as 96 jamo (288 bytes) made an account
    /// whose name the login refused as too long.
    #[test]
    fn a_name_login_refuses_is_refused_at_registration() {
        let composed = "한".repeat(32);
        assert!(Username::parse(&composed).is_ok());
        let decomposed: String = composed.nfd().collect();
        assert!(decomposed.len() > MAX_TYPED_BYTES);
        assert_eq!(
            Username::parse(&decomposed).unwrap_err(),
            "username must be at most 256 bytes as typed"
        );
    }

    #[test]
    fn look_alikes_within_one_script_share_a_skeleton() {
        let admin = Username::parse("admin").unwrap().skeleton();
        for raw in ["admın", "ADMIN", "ＡＤＭıＮ"] {
            assert_eq!(Username::parse(raw).map(|u| u.skeleton()), Ok(admin.clone()), "{raw}");
        }
        // Refused outright: another script's letter, a small capital.
        for raw in ["аdmin", "ᴀdmin", "adᴍin"] {
            assert!(Username::parse(raw).is_err(), "{raw}");
        }
        // Living scripts of limited use are names like any other.
        for raw in ["ᏣᎳᎩ", "ꆈꌠꁱꂷ", "ߒߞߏ"] {
            assert!(Username::parse(raw).is_ok(), "{raw}: {:?}", Username::parse(raw));
        }
        // A name stored before normalisation keys like its normal form.
        assert_eq!(skeleton_key("ADMIN"), skeleton_key("admin"));
        assert_eq!(
            Username::parse("victirn").unwrap().skeleton(),
            Username::parse("victim").unwrap().skeleton()
        );
        assert_eq!(
            Username::parse("user1").unwrap().skeleton(),
            Username::parse("userl").unwrap().skeleton()
        );
        // Names that merely differ stay apart.
        for (a, b) in [("alice", "alicia"), ("bob", "rob"), ("张三", "李四"), ("café", "cafe2")] {
            assert_ne!(skeleton_key(a), skeleton_key(b), "{a} {b}");
        }
    }

    #[test]
    fn one_identity_however_typed() {
        for raw in ["admin", "ADMIN", "Admin", "ａｄｍｉｎ", "ＡＤＭＩＮ"] {
            assert_eq!(Username::parse(raw).unwrap().key(), "admin", "{raw}");
        }
        let u = Username::parse("InpUser").unwrap();
        assert_eq!((u.key(), u.display()), ("inpuser", "InpUser"));
        assert_eq!(identity_key("STRASSE"), identity_key("straße"));
    }

    #[test]
    fn look_alikes_and_invisible_characters_are_refused() {
        // Latin "p", Cyrillic "а" (U+0430), Latin "ypal".
        assert!(Username::parse("p\u{0430}ypal").is_err());
        assert!(Username::parse("ad\u{200B}min").is_err());
        assert!(Username::parse("evil\u{202E}gnp").is_err());
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse("has space").is_err());
        // One script, or the CJK combinations, are fine.
        for ok in ["иван", "张三丰", "田中たなか", "kim김철수", "user_1.x@y"] {
            assert!(Username::parse(ok).is_ok(), "{ok}");
        }
        assert!(check_display_text("Fan \u{202E}gnp.exe").is_err());
        assert!(check_display_text("Fan 张三 🎫").is_ok());
    }
}
