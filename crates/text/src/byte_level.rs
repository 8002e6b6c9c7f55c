//! GPT-2's byte-to-character map, which byte-level BPE vocabularies are spelled in.
//!
//! Each of the 256 byte values is written as one printable character: the printable bytes
//! `!`..`~`, `¡`..`¬` and `®`..`ÿ` stand for themselves, the other 68 (space, control bytes, ...)
//! become U+0100.. in byte order, so a space is `Ġ` (U+0120) and a newline `Ċ` (U+010A).

/// Whether byte `b` stands for itself in the map.
const fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character that spells each byte, indexed by byte.
pub(crate) const BYTE_CHARS: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        table[b] = if is_printable(b as u8) {
            b as u8 as char
        } else {
            let c = match char::from_u32(256 + shifted) {
                Some(c) => c,
                None => panic!("U+0100..U+0143 are valid characters"),
            };
            shifted += 1;
            c
        };
        b += 1;
    }
    table
};

/// The bytes spelled U+0100.., in order.
const SHIFTED_BYTES: [u8; 68] = {
    let mut table = [0u8; 68];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
};

/// The byte that character `c` spells, if it is in the alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && is_printable(code as u8) {
        return Some(code as u8);
    }
    let shifted = code.checked_sub(256)? as usize;
    SHIFTED_BYTES.get(shifted).copied()
}

/// Whether every character of `token` is in the alphabet.
pub(crate) fn is_spelled(token: &str) -> bool {
    token.chars().all(|c| char_to_byte(c).is_some())
}

/// `text`'s UTF-8 bytes spelled in the alphabet.
pub(crate) fn spell(text: &str) -> String {
    text.bytes().map(|b| BYTE_CHARS[usize::from(b)]).collect()
}

/// The bytes a vocabulary token stands for: its characters mapped back to bytes, or, when any
/// character is outside the alphabet (a special token written plainly), its own UTF-8 bytes.
pub(crate) fn token_bytes(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(char_to_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_a_bijection_onto_its_alphabet() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_CHARS[usize::from(b)]), Some(b));
        }
        assert_eq!(BYTE_CHARS[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_CHARS[usize::from(b'\n')], 'Ċ');
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn spelling_round_trips() {
        let text = "héllo wörld 😀\n";
        assert_eq!(token_bytes(&spell(text)), text.as_bytes());
        assert!(is_spelled(&spell(text)));
        assert_eq!(token_bytes("<|im end|>"), b"<|im end|>");
    }
}
