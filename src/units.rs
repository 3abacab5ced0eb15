//! Units that are easy to mix up, as newtypes: virtio speaks in 512-byte sectors whatever the
//! logical block size, while the engines speak in bytes.

use std::fmt;

/// The virtio-blk sector: always 512 bytes, independent of the advertised block size.
pub const SECTOR_SIZE: u64 = 512;

/// A position or a count in 512-byte virtio sectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sectors(pub u64);

impl Sectors {
    /// The byte count, or `None` if it does not fit in a u64 (a guest can ask for that).
    pub fn to_bytes(self) -> Option<Bytes> {
        self.0.checked_mul(SECTOR_SIZE).map(Bytes)
    }
}

/// A position or a length in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Whole sectors in this many bytes (rounded down).
    pub fn to_sectors(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }

    pub fn checked_add(self, other: Bytes) -> Option<Bytes> {
        self.0.checked_add(other.0).map(Bytes)
    }

    pub fn is_multiple_of(self, n: u64) -> bool {
        n != 0 && self.0 % n == 0
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// A byte range of the virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: Bytes,
    pub len: Bytes,
}

impl ByteRange {
    /// The end of the range, or `None` on overflow.
    pub fn end(&self) -> Option<Bytes> {
        self.offset.checked_add(self.len)
    }
}

/// Parses a human size such as `10G`, `512M`, `4096`, `1T` (binary multiples).
pub fn parse_size(s: &str) -> Result<Bytes, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("invalid size suffix in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .map(Bytes)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(Bytes(4096)));
        assert_eq!(parse_size("1K"), Ok(Bytes(1024)));
        assert_eq!(parse_size("3G"), Ok(Bytes(3 << 30)));
        assert_eq!(parse_size("16T"), Ok(Bytes(16 << 40)));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sector_overflow_is_caught() {
        assert_eq!(Sectors(u64::MAX).to_bytes(), None);
        assert_eq!(Sectors(2).to_bytes(), Some(Bytes(1024)));
    }
}
