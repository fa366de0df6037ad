//! The number types the kernels and the norms share: the storage trait over f32 and f64,
//! and two ways of carrying a value beyond f64's range exactly (`Norm`, `WideFactor`).

/// A parameter storage type: f32 or f64.
pub trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// `2^e` for `e` in f64's normal exponent range.
pub fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// A norm as `mantissa·2^exponent`, so that one outside f64's range (or subnormal, with
/// few significant bits) keeps its full precision for what is computed from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub mantissa: f64,
    pub exponent: i32,
}

impl Norm {
    /// A norm already in f64 range.
    pub fn of(value: f64) -> Norm {
        Norm {
            mantissa: value,
            exponent: 0,
        }
    }

    /// The norm as an f64 (infinite, subnormal or zero where it must be).
    pub fn value(self) -> f64 {
        let (mut x, mut e) = (self.mantissa, self.exponent);
        while e > 1000 {
            (x, e) = (x * pow2(1000), e - 1000);
        }
        while e < -1000 {
            (x, e) = (x * pow2(-1000), e + 1000);
        }
        x * pow2(e)
    }
}

/// A factor that may lie beyond f64's range (ρ/‖g‖ for a subnormal ‖g‖), applied to
/// values small enough that the product fits: `x·f` is computed as
/// `((x·pre₀)·pre₁)·mantissa` with exact power-of-two `pre`. In range, `pre` is (1, 1) and
/// the result is exactly `x·mantissa`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WideFactor {
    mantissa: f64,
    pre: (f64, f64),
}

impl WideFactor {
    pub const ONE: WideFactor = WideFactor {
        mantissa: 1.0,
        pre: (1.0, 1.0),
    };

    /// `numerator / denominator` for a finite numerator and a positive, finite denominator.
    pub fn ratio(numerator: f64, denominator: f64) -> WideFactor {
        let direct = numerator / denominator;
        if direct.is_finite() {
            return WideFactor {
                mantissa: direct,
                pre: (1.0, 1.0),
            };
        }
        // Bring the denominator into [1, 2) with an exact power of two split in two factors.
        let shift = -(denominator.log2().floor() as i32);
        let half = shift / 2;
        let pre = (pow2(half), pow2(shift - half));
        WideFactor {
            mantissa: numerator / (denominator * pre.0 * pre.1),
            pre,
        }
    }

    /// `numerator / (mantissa·2^exponent)`: the same for a denominator given as a `Norm`
    /// (a subnormal norm loses no bits this way). Exponents beyond ±2044 are clamped, far
    /// past anything finite inputs produce.
    pub fn ratio_scaled(numerator: f64, denominator: Norm) -> WideFactor {
        if denominator.exponent == 0 {
            return WideFactor::ratio(numerator, denominator.mantissa);
        }
        let shift = (-denominator.exponent).clamp(-2044, 2044);
        let half = shift / 2;
        WideFactor {
            mantissa: numerator / denominator.mantissa,
            pre: (pow2(half), pow2(shift - half)),
        }
    }

    #[inline(always)]
    pub fn apply(self, x: f64) -> f64 {
        x * self.pre.0 * self.pre.1 * self.mantissa
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_factor_reaches_beyond_f64_range_exactly_in_range() {
        let tiny = 4e-320; // subnormal: 0.05 / tiny overflows
        let factor = WideFactor::ratio(0.05, tiny);
        let moved = factor.apply(3e-320);
        assert!((moved - 0.05 * 0.75).abs() < 1e-3 * 0.05, "{moved}");
        assert_eq!(WideFactor::ratio(0.05, 2.0).apply(3.0), 3.0 * (0.05 / 2.0));
    }

    #[test]
    fn norm_value_leaves_range_only_where_it_must() {
        let huge = Norm {
            mantissa: 1.5,
            exponent: 1100,
        };
        assert_eq!(huge.value(), f64::INFINITY);
        let small = Norm {
            mantissa: 1.0,
            exponent: -1074,
        };
        assert_eq!(small.value(), f64::from_bits(1));
        assert_eq!(Norm::of(3.0).value(), 3.0);
    }
}
