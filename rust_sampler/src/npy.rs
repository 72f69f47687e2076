//! The `.npy` header: magic, version, and the Python-literal dict that describes the array.
//! Only what a token file may be is accepted: a 1-D, C-ordered, little-endian array of
//! uint16, uint32, int32 or int64; or, read as a loss mask (`Kind::Mask`), a 1-D, C-ordered
//! uint8 array. Everything else is a `Format` error that says why.
//!
//! Format reference: numpy/lib/format.py (versions 1.0, 2.0 and 3.0).

use crate::error::{Result, SamplerError};
use crate::source::Dtype;
use std::path::Path;

pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// What a `.npy` file is read as: its header is checked against what that kind may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A token file: uint16, uint32, int32 or int64.
    Tokens,
    /// A loss mask: uint8, 1 where the token at that position is a training target.
    Mask,
}

/// What every refusal of a loss mask's header ends with.
pub const MASK_FIX: &str = "it must be a uint8 .npy loss mask (numpy.save of a 1-D uint8 array, 1 \
                            where a token is a training target, else 0); prepare the folder again";

/// What a valid token `.npy` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: Dtype,
    pub len: u64,
    /// Byte offset of the first token.
    pub data_offset: usize,
}

/// The dict keys a header may carry, as parsed (before the token-file checks).
#[derive(Debug, Default)]
struct RawHeader {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<u64>>,
}

/// Parses and checks the header of a token file at the start of `bytes` (the file's first
/// bytes; more may follow). `path` only names the file in errors.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    parse_header_as(bytes, path, Kind::Tokens)
}

/// `parse_header` for a file of the given kind: a loss mask's header must say uint8.
pub fn parse_header_as(bytes: &[u8], path: &Path, kind: Kind) -> Result<NpyHeader> {
    let bad = |reason: String| SamplerError::format(path, reason);
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad(match kind {
            Kind::Tokens => "not a .npy file (bad magic bytes); write it with numpy.save, or pass \
                             a raw .bin file with an explicit dtype"
                .into(),
            Kind::Mask => format!("not a .npy file (bad magic bytes); {MASK_FIX}"),
        }));
    }
    if bytes.len() < 10 {
        return Err(bad(
            "truncated .npy header; the file is incomplete, write it again".into(),
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad(
                    "truncated .npy header; the file is incomplete, write it again".into(),
                ));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor}; write it with numpy.save"
            )))
        }
    };
    let end = start + header_len;
    if bytes.len() < end {
        return Err(bad(
            "truncated .npy header; the file is incomplete, write it again".into(),
        ));
    }
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("the .npy header is not text; the file is corrupted".into()))?;
    let raw = parse_dict(text).map_err(|e| {
        bad(format!(
            "malformed .npy header ({e}); the file is corrupted"
        ))
    })?;

    let descr = raw
        .descr
        .ok_or_else(|| bad("the .npy header has no 'descr'; the file is corrupted".into()))?;
    let fortran = raw.fortran_order.ok_or_else(|| {
        bad("the .npy header has no 'fortran_order'; the file is corrupted".into())
    })?;
    let shape = raw
        .shape
        .ok_or_else(|| bad("the .npy header has no 'shape'; the file is corrupted".into()))?;

    let dtype = match kind {
        Kind::Tokens => dtype_from_descr(&descr),
        Kind::Mask => mask_dtype_from_descr(&descr),
    }
    .map_err(bad)?;
    if shape.len() != 1 {
        let what = match kind {
            Kind::Tokens => "a token file",
            Kind::Mask => "a loss mask",
        };
        return Err(bad(format!(
            "holds a {}-D array of shape {:?}; {what} is 1-D, save data.reshape(-1)",
            shape.len(),
            shape
        )));
    }
    if fortran {
        return Err(bad(
            "is stored in Fortran order; save a C-ordered array (numpy.ascontiguousarray)".into(),
        ));
    }
    Ok(NpyHeader {
        dtype,
        len: shape[0],
        data_offset: end,
    })
}

/// Maps a numpy type string to a token dtype, or says what is wrong with it.
pub fn dtype_from_descr(descr: &str) -> std::result::Result<Dtype, String> {
    let fix = format!(
        "token files hold {} (little-endian)",
        crate::source::file_dtypes_text()
    );
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => (descr.as_bytes()[0], &descr[1..]),
        _ => (b'=', descr),
    };
    let file_dtype = crate::source::FILE_DTYPES
        .into_iter()
        .find(|d| d.code() == code);
    let dtype = match (file_dtype, code) {
        (Some(d), _) => d,
        (None, c) if c.starts_with('f') || c.starts_with('c') => {
            return Err(format!(
                "holds floating-point data (dtype '{descr}'); {fix}, e.g. data.astype(np.uint16)"
            ))
        }
        _ => return Err(format!("has dtype '{descr}'; {fix}")),
    };
    if order == b'>' {
        return Err(format!(
            "is big-endian (dtype '{descr}'); {fix}, e.g. data.astype('<u2')"
        ));
    }
    Ok(dtype)
}

/// A loss mask's type string: uint8 (numpy writes "|u1"; the byte order of one byte does not
/// matter), or why not.
pub fn mask_dtype_from_descr(descr: &str) -> std::result::Result<Dtype, String> {
    let code = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => &descr[1..],
        _ => descr,
    };
    if code == Dtype::U8.code() {
        Ok(Dtype::U8)
    } else {
        Err(format!("has dtype '{descr}'; {MASK_FIX}"))
    }
}

/// A tiny parser for the header dict: `{'key': value, ...}` where a value is a quoted string,
/// True/False, or a tuple of non-negative integers. That is all numpy writes there.
fn parse_dict(text: &str) -> std::result::Result<RawHeader, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = RawHeader::default();
    p.ws();
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => out.descr = Some(p.string()?),
            "fortran_order" => out.fortran_order = Some(p.boolean()?),
            "shape" => out.shape = Some(p.tuple()?),
            other => return Err(format!("unexpected key '{other}'")),
        }
        p.ws();
        if p.eat(b',') {
            continue;
        }
        p.ws();
        p.expect(b'}')?;
        break;
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at byte {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("unterminated string".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }
    fn boolean(&mut self) -> std::result::Result<bool, String> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            Err(format!("expected True or False at byte {}", self.i))
        }
    }
    fn tuple(&mut self) -> std::result::Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            // numpy may write `3L` for longs in very old files.
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            let n: u64 = digits
                .parse()
                .map_err(|_| format!("expected a dimension at byte {start}"))?;
            self.eat(b'L');
            dims.push(n);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header the way numpy 1.x/2.x writes it: version 1.0, padded with spaces to a
    /// multiple of 64 bytes and ended by a newline.
    pub(crate) fn header(dict: &str) -> Vec<u8> {
        let mut body = dict.as_bytes().to_vec();
        let total = 10 + body.len() + 1;
        let pad = (64 - total % 64) % 64;
        body.extend(std::iter::repeat_n(b' ', pad));
        body.push(b'\n');
        let mut out = MAGIC.to_vec();
        out.extend([1u8, 0]);
        out.extend((body.len() as u16).to_le_bytes());
        out.extend(body);
        out
    }

    fn parse(bytes: &[u8]) -> Result<NpyHeader> {
        parse_header(bytes, Path::new("t.npy"))
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    #[test]
    fn good_headers() {
        for (descr, dtype) in [
            ("<u2", Dtype::U16),
            ("<u4", Dtype::U32),
            ("<i4", Dtype::I32),
            ("<i8", Dtype::I64),
        ] {
            let h = header(&format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': (1000,), }}"
            ));
            let got = parse(&h).unwrap();
            assert_eq!(
                got,
                NpyHeader {
                    dtype,
                    len: 1000,
                    data_offset: h.len()
                }
            );
            assert_eq!(got.data_offset % 64, 0);
        }
    }

    #[test]
    fn version_2_and_key_order() {
        let dict = b"{'shape': (7,), 'fortran_order': False, 'descr': '<u2'}\n";
        let mut h = MAGIC.to_vec();
        h.extend([2u8, 0]);
        h.extend((dict.len() as u32).to_le_bytes());
        h.extend(dict);
        let got = parse(&h).unwrap();
        assert_eq!(
            (got.dtype, got.len, got.data_offset),
            (Dtype::U16, 7, 12 + dict.len())
        );
    }

    #[test]
    fn empty_and_one_byte_arrays_parse() {
        let h = header("{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }");
        assert!(err(&h).contains("dtype '|u1'"));
        let h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (0,), }");
        assert_eq!(parse(&h).unwrap().len, 0);
    }

    #[test]
    fn mask_headers_take_uint8_only() {
        let p = Path::new("m.npy");
        for descr in ["|u1", "<u1", "u1", "=u1"] {
            let h = header(&format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': (30,), }}"
            ));
            let got = parse_header_as(&h, p, Kind::Mask).unwrap();
            assert_eq!(
                (got.dtype, got.len, got.data_offset),
                (Dtype::U8, 30, h.len())
            );
            // Token files still refuse uint8.
            assert!(parse(&h).is_err(), "{descr}");
        }
        for descr in ["<u2", "|i1", "|b1", "<f4", "<i8"] {
            let h = header(&format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': (30,), }}"
            ));
            let e = parse_header_as(&h, p, Kind::Mask).unwrap_err().to_string();
            assert!(
                e.starts_with("m.npy: has dtype") && e.contains("must be a uint8 .npy loss mask"),
                "{e}"
            );
        }
        let e = parse_header_as(b"raw bytes, not npy", p, Kind::Mask)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a .npy file") && e.contains("uint8 .npy loss mask"),
            "{e}"
        );
        let h = header("{'descr': '|u1', 'fortran_order': False, 'shape': (3, 2), }");
        let e = parse_header_as(&h, p, Kind::Mask).unwrap_err().to_string();
        assert!(e.contains("a loss mask is 1-D"), "{e}");
    }

    #[test]
    fn truncated() {
        let h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (10,), }");
        for cut in [0, 3, 6, 8, 9, 20, h.len() - 1] {
            let e = err(&h[..cut]);
            assert!(
                e.contains("truncated") || e.contains("magic"),
                "cut {cut}: {e}"
            );
        }
        assert!(err(&h[..20]).contains("truncated"));
    }

    #[test]
    fn wrong_magic() {
        let mut h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (10,), }");
        h[1] = b'X';
        assert!(err(&h).contains("bad magic"));
        assert!(err(b"hello world, this is text").contains("not a .npy file"));
    }

    #[test]
    fn float_dtype() {
        for d in ["<f4", "<f8", "<f2", "<c8"] {
            let h = header(&format!(
                "{{'descr': '{d}', 'fortran_order': False, 'shape': (10,), }}"
            ));
            assert!(err(&h).contains("floating-point"), "{d}");
        }
    }

    #[test]
    fn two_dimensional() {
        let h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (10, 2), }");
        let e = err(&h);
        assert!(e.contains("2-D") && e.contains("reshape"), "{e}");
        let h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (), }");
        assert!(err(&h).contains("0-D"));
    }

    #[test]
    fn fortran_order() {
        let h = header("{'descr': '<u2', 'fortran_order': True, 'shape': (10,), }");
        assert!(err(&h).contains("Fortran order"));
    }

    #[test]
    fn big_endian() {
        for d in [">u2", ">i8"] {
            let h = header(&format!(
                "{{'descr': '{d}', 'fortran_order': False, 'shape': (10,), }}"
            ));
            assert!(err(&h).contains("big-endian"), "{d}");
        }
    }

    #[test]
    fn other_dtypes_and_garbage() {
        for d in ["<i2", "|b1", "<U4", "|O", "<u8"] {
            let h = header(&format!(
                "{{'descr': '{d}', 'fortran_order': False, 'shape': (10,), }}"
            ));
            assert!(err(&h).contains("uint16, uint32, int32 or int64"), "{d}");
        }
        for dict in [
            "not a dict",
            "{'descr': '<u2', 'shape': (10,)}",
            "{'descr': '<u2', 'fortran_order': Maybe}",
            "{'descr': '<u2",
        ] {
            let e = err(&header(dict));
            assert!(e.contains("corrupted"), "{dict}: {e}");
        }
        let mut h = header("{'descr': '<u2', 'fortran_order': False, 'shape': (10,), }");
        h[6] = 9;
        assert!(err(&h).contains("version 9"));
    }
}
