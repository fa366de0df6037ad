//! The global L2 norm over many arrays, accumulated in f64, reproducible and free of
//! spurious overflow or underflow.
//!
//! The fast path sums squares directly. A finite sum proves every element finite; a sum
//! that is not finite or is so small that squares may have lost bits to underflow sends the
//! call to a rescaled second pass, with power-of-two factors so the rescaling is exact.

use crate::float::{pow2, Norm, Real, WideFactor};
use crate::parallel::{max_of, ordered_sum, ByDtype};

/// One array's streams for a norm: the gradient and, for adaptive SAM, its parameter and
/// the group's eta (weighting each element by `|p| + eta`).
pub type NormLanes<'a, T> = (&'a [T], Option<(&'a [T], f64)>);
pub type NormItem<'a> = ByDtype<NormLanes<'a, f32>, NormLanes<'a, f64>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormError {
    /// Index of the first item (in the given order) whose gradient has a NaN or an infinity.
    NonFiniteGradient(usize),
    /// Index of the first item whose parameter (adaptive weighting) is not finite.
    NonFiniteParameter(usize),
}

/// Below this, squares of the elements may have underflowed enough to matter.
const SMALLEST_SAFE_SUM: f64 = 1.0e-270;

/// `‖w⊙g‖₂` over all items, with `w = |p| + eta` where an item carries its parameter (and
/// its eta) and `w = 1` where it does not.
pub fn global_norm(items: &[NormItem<'_>]) -> Result<f64, NormError> {
    global_norm_parts(items).map(Norm::value)
}

/// `global_norm` as a `Norm`.
pub fn global_norm_parts(items: &[NormItem<'_>]) -> Result<Norm, NormError> {
    let unit = Pow2Scale::ONE;
    let sum = ordered_sum(items.iter().copied(), |piece| match piece {
        ByDtype::Single(lanes) => weighted_sum_squares(lanes, unit, unit),
        ByDtype::Double(lanes) => weighted_sum_squares(lanes, unit, unit),
    });
    if sum.is_finite() && sum >= SMALLEST_SAFE_SUM {
        return Ok(Norm {
            mantissa: sum.sqrt(),
            exponent: 0,
        });
    }
    if !sum.is_finite() {
        if let Some(error) = first_non_finite(items) {
            return Err(error);
        }
    }
    Ok(rescaled_norm(items))
}

/// Fails on the first item with a non-finite gradient. One read pass: a finite sum of
/// squares proves every element finite; only a non-finite sum needs the element scan.
pub fn check_finite(items: &[NormItem<'_>]) -> Result<(), NormError> {
    let unit = Pow2Scale::ONE;
    let sum = ordered_sum(items.iter().copied(), |piece| match piece {
        ByDtype::Single(lanes) => weighted_sum_squares(lanes, unit, unit),
        ByDtype::Double(lanes) => weighted_sum_squares(lanes, unit, unit),
    });
    match sum.is_finite() {
        true => Ok(()),
        false => first_non_finite(items).map_or(Ok(()), Err),
    }
}

/// Two equally long streams of one array, for a dot product.
pub type DotLanes<'a, T> = (&'a [T], &'a [T]);
pub type DotItem<'a> = ByDtype<DotLanes<'a, f32>, DotLanes<'a, f64>>;

/// `Σ (x/nx)·(y/ny)` over all items, reproducibly: with `nx`, `ny` the norms of the two
/// streams this is their cosine, and no term can overflow. `nx` comes as a `Norm`, so a
/// subnormal one loses no bits.
pub fn normalised_dot(items: &[DotItem<'_>], nx: Norm, ny: f64) -> f64 {
    fn partial<T: Real>((x, y): DotLanes<'_, T>, nx: Norm, ny: f64) -> f64 {
        let y = &y[..x.len()];
        let shift = WideFactor::ratio_scaled(
            1.0,
            Norm {
                mantissa: 1.0,
                exponent: nx.exponent,
            },
        );
        let mut acc = [0.0f64; 4];
        for (i, (&xi, &yi)) in x.iter().zip(y).enumerate() {
            acc[i % 4] += (shift.apply(xi.to_f64()) / nx.mantissa) * (yi.to_f64() / ny);
        }
        (acc[0] + acc[1]) + (acc[2] + acc[3])
    }
    ordered_sum(items.iter().copied(), |piece| match piece {
        ByDtype::Single(lanes) => partial(lanes, nx, ny),
        ByDtype::Double(lanes) => partial(lanes, nx, ny),
    })
}

/// Whether any gradient element is NaN (as opposed to only infinite).
pub fn any_nan(items: &[NormItem<'_>]) -> bool {
    items.iter().any(|item| match item {
        ByDtype::Single((g, _)) => g.iter().any(|x| x.is_nan()),
        ByDtype::Double((g, _)) => g.iter().any(|x| x.is_nan()),
    })
}

fn first_non_finite(items: &[NormItem<'_>]) -> Option<NormError> {
    fn check<T: Real>(index: usize, (g, p): NormLanes<'_, T>) -> Option<NormError> {
        if !g.iter().all(|x| x.to_f64().is_finite()) {
            return Some(NormError::NonFiniteGradient(index));
        }
        match p {
            Some((p, _)) if !p.iter().all(|x| x.to_f64().is_finite()) => {
                Some(NormError::NonFiniteParameter(index))
            }
            _ => None,
        }
    }
    items
        .iter()
        .enumerate()
        .find_map(|(index, item)| match *item {
            ByDtype::Single(lanes) => check(index, lanes),
            ByDtype::Double(lanes) => check(index, lanes),
        })
}

fn rescaled_norm(items: &[NormItem<'_>]) -> Norm {
    let max_g = max_of(items.iter().copied(), |piece| match piece {
        ByDtype::Single((g, _)) => max_abs(g),
        ByDtype::Double((g, _)) => max_abs(g),
    });
    let max_w = max_of(items.iter().copied(), |piece| match piece {
        ByDtype::Single((g, p)) => max_weight(g.len(), p),
        ByDtype::Double((g, p)) => max_weight(g.len(), p),
    });
    if max_g == 0.0 || max_w == 0.0 {
        return Norm {
            mantissa: 0.0,
            exponent: 0,
        };
    }
    let (scale_g, scale_w) = (Pow2Scale::normalising(max_g), Pow2Scale::normalising(max_w));
    let sum = ordered_sum(items.iter().copied(), |piece| match piece {
        ByDtype::Single(lanes) => weighted_sum_squares(lanes, scale_g, scale_w),
        ByDtype::Double(lanes) => weighted_sum_squares(lanes, scale_g, scale_w),
    });
    Norm {
        mantissa: sum.sqrt(),
        exponent: scale_g.exponent + scale_w.exponent,
    }
}

fn max_abs<T: Real>(g: &[T]) -> f64 {
    g.iter().fold(0.0, |m, x| m.max(x.to_f64().abs()))
}

fn max_weight<T: Real>(len: usize, p: Option<(&[T], f64)>) -> f64 {
    match p {
        Some((p, eta)) => p.iter().fold(0.0, |m, x| m.max(x.to_f64().abs() + eta)),
        None if len > 0 => 1.0,
        None => 0.0,
    }
}

/// Multiplication by `2^-e`, split in two factors so that neither overflows or underflows
/// for any `e` an f64 can have. Exact for every element that stays a normal number.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pow2Scale {
    first: f64,
    second: f64,
    exponent: i32,
}

impl Pow2Scale {
    const ONE: Pow2Scale = Pow2Scale {
        first: 1.0,
        second: 1.0,
        exponent: 0,
    };

    /// The scale that brings `max` (positive, finite) into [1, 2).
    fn normalising(max: f64) -> Self {
        let exponent = max.log2().floor() as i32;
        let half = exponent / 2;
        Pow2Scale {
            first: pow2(-half),
            second: pow2(half - exponent),
            exponent,
        }
    }

    #[inline(always)]
    fn apply(self, x: f64) -> f64 {
        x * self.first * self.second
    }
}

/// Independent partial sums of a sum of squares: enough that the loop is limited by memory,
/// not by the latency of one addition chain (four vectors of four f64 with AVX2).
const LANES: usize = 16;
const HALF: usize = LANES / 2;

/// `Σ (w·g)²` over one piece, `LANES` independent accumulators so the loop vectorises and
/// pipelines; the grouping is fixed, so the result is too.
fn weighted_sum_squares<T: Real>(
    lanes: NormLanes<'_, T>,
    scale_g: Pow2Scale,
    scale_w: Pow2Scale,
) -> f64 {
    widest!(sum_squares_body(lanes, scale_g, scale_w))
}

kernel_body!(sum_squares_body[T: Real](
    lanes: NormLanes<'_, T>,
    scale_g: Pow2Scale,
    scale_w: Pow2Scale
) -> f64 {
    let (g, p) = lanes;
    let mut sums = Sums::default();
    match p {
        // The common case: `x·1·1` is `x`, so the scaling can go (it costs more than the
        // square and the sum).
        None if scale_g == Pow2Scale::ONE => sums.add_squares(g, g, |gi, _| gi),
        None => sums.add_squares(g, g, |gi, _| scale_g.apply(gi)),
        Some((p, eta)) => sums.add_squares(g, &p[..g.len()], |gi, pi| {
            scale_w.apply(pi.abs() + eta) * scale_g.apply(gi)
        }),
    }
    sums.total()
});

/// `LANES` running sums of squares, element `i` of a piece going to sum `i % LANES`.
/// Kept as two halves of eight: as one array of sixteen, LLVM moved it through the stack
/// on every block for float32.
#[derive(Default)]
struct Sums {
    low: [f64; HALF],
    high: [f64; HALF],
}

impl Sums {
    /// Adds `term(g, p)²` for every element (`g` and `p` equally long).
    #[inline(always)]
    fn add_squares<T: Real>(&mut self, g: &[T], p: &[T], term: impl Fn(f64, f64) -> f64) {
        let (mut g_blocks, mut p_blocks) = (g.chunks_exact(LANES), p.chunks_exact(LANES));
        for (gb, pb) in (&mut g_blocks).zip(&mut p_blocks) {
            for k in 0..HALF {
                let x = term(gb[k].to_f64(), pb[k].to_f64());
                self.low[k] += x * x;
            }
            for k in 0..HALF {
                let x = term(gb[HALF + k].to_f64(), pb[HALF + k].to_f64());
                self.high[k] += x * x;
            }
        }
        let tail = g_blocks.remainder().iter().zip(p_blocks.remainder());
        for (k, (&gi, &pi)) in tail.enumerate() {
            let x = term(gi.to_f64(), pi.to_f64());
            match k < HALF {
                true => self.low[k] += x * x,
                false => self.high[k - HALF] += x * x,
            }
        }
    }

    fn total(self) -> f64 {
        let mut acc = [0.0f64; LANES];
        acc[..HALF].copy_from_slice(&self.low);
        acc[HALF..].copy_from_slice(&self.high);
        pairwise(acc)
    }
}

/// The accumulators summed as a balanced tree, in a fixed grouping (element `k` with
/// `k + half`, halving until one is left).
#[inline(always)]
fn pairwise(mut acc: [f64; LANES]) -> f64 {
    let mut half = LANES / 2;
    while half > 0 {
        for k in 0..half {
            acc[k] += acc[k + half];
        }
        half /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::CHUNK_LEN;

    fn plain(g: &[f64]) -> NormItem<'_> {
        ByDtype::Double((g, None))
    }

    #[test]
    fn huge_and_tiny_values_do_not_overflow_or_underflow() {
        let huge = [1e200, 1e200];
        let n = global_norm(&[plain(&huge)]).unwrap();
        assert!((n / (2f64.sqrt() * 1e200) - 1.0).abs() < 1e-15, "{n}");
        let tiny = [1e-200];
        let n = global_norm(&[plain(&tiny)]).unwrap();
        assert!((n / 1e-200 - 1.0).abs() < 1e-15, "{n}");
        let subnormal = [f64::from_bits(1), f64::from_bits(1)];
        let n = global_norm(&[plain(&subnormal)]).unwrap();
        assert_eq!(n, f64::from_bits(1) * 2f64.sqrt());
        let largest = [f64::MAX];
        assert_eq!(global_norm(&[plain(&largest)]).unwrap(), f64::MAX);
    }

    #[test]
    fn zero_and_empty_give_zero() {
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
        let zeros = [0.0; 9];
        assert_eq!(global_norm(&[plain(&zeros), plain(&[])]).unwrap(), 0.0);
    }

    #[test]
    fn non_finite_names_first_bad_item() {
        let good = [1.0, 2.0];
        let bad = [1.0, f64::NAN];
        let inf = [f64::INFINITY];
        let items = [plain(&good), plain(&inf), plain(&bad)];
        assert_eq!(global_norm(&items), Err(NormError::NonFiniteGradient(1)));
        assert!(any_nan(&items));
        assert!(!any_nan(&items[..2]));
    }

    #[test]
    fn mixed_dtypes_and_weights() {
        let g32 = [3.0f32];
        let g64 = [4.0f64, 0.0];
        let p64 = [-1.0f64, 7.0];
        let items = [
            ByDtype::Single((&g32[..], None)),
            ByDtype::Double((&g64[..], Some((&p64[..], 0.5)))),
        ];
        // weights: 1 for the f32 array; |-1|+0.5 and |7|+0.5 for the f64 one.
        let n = global_norm(&items).unwrap();
        assert_eq!(n, (9.0f64 + 36.0).sqrt());
        let items = [ByDtype::Double((
            &g64[..],
            Some((&[f64::INFINITY, 1.0][..], 0.0)),
        ))];
        assert_eq!(global_norm(&items), Err(NormError::NonFiniteParameter(0)));
    }

    #[test]
    fn normalised_dot_is_a_cosine_even_for_huge_values() {
        let x = [3e300, 4e300];
        let y = [4e300, 3e300];
        let items = [ByDtype::Double((&x[..], &y[..]))];
        let norm = Norm {
            mantissa: 5e300,
            exponent: 0,
        };
        let cos = normalised_dot(&items, norm, 5e300);
        assert!((cos - 24.0 / 25.0).abs() < 1e-15, "{cos}");
    }

    #[test]
    fn result_is_independent_of_thread_count() {
        let g: Vec<f64> = (0..7 * CHUNK_LEN + 5)
            .map(|i| ((i * 7919) % 1000) as f64 * 1e-3)
            .collect();
        let items = [plain(&g)];
        let reference = global_norm(&items).unwrap();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let n = pool.install(|| global_norm(&items).unwrap());
            assert_eq!(n.to_bits(), reference.to_bits());
        }
        let exact: f64 = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((reference / exact - 1.0).abs() < 1e-13);
    }
}
