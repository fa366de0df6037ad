//! The SAM family's own element-wise passes: each writes a variant's ascent direction
//! into a buffer of the variant's, which SAM's ascent (`phases::perturb`) then follows.
//!
//! - `centralize` (GCSAM, Hassan et al. 2025; the operator of Yong et al. 2020): an array
//!   of two or more dimensions loses the mean of each slice along its first axis,
//!   `g_c[r, ...] = g[r, ...] − mean(g[r, ...])`; 0-d and 1-d arrays are copied.
//! - `mask` (ESAM's stochastic weight perturbation, Du et al. ICLR 2022): `m ⊙ g` with
//!   `m_i ~ Bernoulli(β)` drawn by a counter-based generator, so the draw of an element
//!   depends on the seed, the draw number, the parameter's name and the element's index
//!   only, never on threads, chunks or dict order.
//! - `fisher` (Fisher SAM, Kim et al. ICML 2022): `f⁻¹ ⊙ g` with the diagonal Fisher
//!   `f = 1 + η·g²` of the mini-batch gradient.

use crate::float::Real;
use crate::parallel::{for_each, ByDtype, Split};

/// The flat index, in its array, of a piece's first element.
#[derive(Clone, Copy, Debug)]
pub struct Offset(pub usize);

impl Split for Offset {
    fn split_at(self, mid: usize) -> (Self, Self) {
        (self, Offset(self.0 + mid))
    }
}

/// A per-array value that travels whole with every piece.
#[derive(Clone, Copy, Debug)]
pub struct Whole<X>(pub X);

impl<X: Copy> Split for Whole<X> {
    fn split_at(self, _: usize) -> (Self, Self) {
        (self, self)
    }
}

/// How an array's flat elements fall into slices along its first axis: `rows` slices (0:
/// the array is not centralised) in C or Fortran order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub rows: usize,
    pub fortran: bool,
}

impl Rows {
    /// The rows of an array of this shape: along its first axis when it has two or more.
    pub fn of(shape: &[usize], fortran: bool) -> Rows {
        let rows = if shape.len() > 1 { shape[0] } else { 0 };
        Rows { rows, fortran }
    }

    #[inline(always)]
    fn row_of(self, index: usize, row_len: usize) -> usize {
        match self.fortran {
            true => index % self.rows,
            false => index / row_len,
        }
    }
}

/// An output buffer, the gradient and how the array falls into rows.
pub type CentreSource<'a, T> = (&'a mut [T], &'a [T], Rows);
pub type CentreItem<'a> = ByDtype<CentreSource<'a, f32>, CentreSource<'a, f64>>;

/// Each row's mean, summed in f64 in the order of the flat elements.
fn row_means<T: Real>(g: &[T], rows: Rows) -> Vec<f64> {
    if rows.rows == 0 || g.is_empty() {
        return Vec::new();
    }
    let row_len = g.len() / rows.rows;
    let mut sums = vec![0.0f64; rows.rows];
    for (i, &x) in g.iter().enumerate() {
        sums[rows.row_of(i, row_len)] += x.to_f64();
    }
    sums.iter().map(|sum| sum / row_len as f64).collect()
}

/// The rows of one array and their means.
#[derive(Clone, Copy, Debug)]
struct Centres<'a> {
    rows: Rows,
    row_len: usize,
    means: &'a [f64],
}

type CentreLanes<'a, T> = (&'a mut [T], &'a [T], Offset, Whole<Centres<'a>>);

fn centre<T: Real>((out, g, Offset(start), Whole(centres)): CentreLanes<'_, T>) {
    let n = out.len();
    let g = &g[..n];
    if centres.rows.rows == 0 {
        out.copy_from_slice(g);
        return;
    }
    for i in 0..n {
        let mean = centres.means[centres.rows.row_of(start + i, centres.row_len)];
        out[i] = T::from_f64(g[i].to_f64() - mean);
    }
}

/// `out ← g − (the mean of g's row)` for every item: the row means first (one read pass
/// per array, each row summed in a fixed order), then one parallel write pass.
pub fn centralize(items: Vec<CentreItem<'_>>) {
    let means: Vec<Vec<f64>> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single((_, g, rows)) => row_means(g, *rows),
            ByDtype::Double((_, g, rows)) => row_means(g, *rows),
        })
        .collect();
    let lanes: Vec<_> = items
        .into_iter()
        .zip(&means)
        .map(|(item, means)| {
            let centres = |len: usize, rows: Rows| Centres {
                rows,
                row_len: len.checked_div(rows.rows).unwrap_or(0),
                means,
            };
            match item {
                ByDtype::Single((out, g, rows)) => {
                    let c = centres(out.len(), rows);
                    ByDtype::Single((out, g, Offset(0), Whole(c)))
                }
                ByDtype::Double((out, g, rows)) => {
                    let c = centres(out.len(), rows);
                    ByDtype::Double((out, g, Offset(0), Whole(c)))
                }
            }
        })
        .collect();
    for_each(lanes, |piece| match piece {
        ByDtype::Single(lanes) => centre(lanes),
        ByDtype::Double(lanes) => centre(lanes),
    });
}

/// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of u64 that mixes
/// every input bit into every output bit.
#[inline(always)]
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the name's UTF-8 bytes: a parameter's stream of draws follows its name.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The key of draw number `draw` of the generator seeded `seed` for the parameter whose
/// name has key `name`.
pub fn draw_key(seed: u64, draw: u64, name: u64) -> u64 {
    mix64(mix64(seed ^ mix64(draw)) ^ name)
}

/// Element `index`'s uniform number in [0, 1) (53 bits) under key `key`.
#[inline(always)]
pub fn uniform(key: u64, index: u64) -> f64 {
    let bits = mix64(key.wrapping_add((index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// An output buffer, the gradient and the key of the array's draw.
pub type MaskSource<'a, T> = (&'a mut [T], &'a [T], u64);
pub type MaskItem<'a> = ByDtype<MaskSource<'a, f32>, MaskSource<'a, f64>>;

type MaskLanes<'a, T> = (&'a mut [T], &'a [T], Offset, Whole<u64>);

fn masked<T: Real>((out, g, Offset(start), Whole(key)): MaskLanes<'_, T>, keep: f64) {
    let n = out.len();
    let g = &g[..n];
    for i in 0..n {
        let kept = uniform(key, (start + i) as u64) < keep;
        out[i] = if kept { g[i] } else { T::from_f64(0.0) };
    }
}

/// `out ← m ⊙ g` with `m_i = [u_i < keep]` for every item, `u_i` the element's uniform
/// number under its array's key.
pub fn mask(items: Vec<MaskItem<'_>>, keep: f64) {
    let lanes: Vec<_> = items
        .into_iter()
        .map(|item| match item {
            ByDtype::Single((out, g, key)) => ByDtype::Single((out, g, Offset(0), Whole(key))),
            ByDtype::Double((out, g, key)) => ByDtype::Double((out, g, Offset(0), Whole(key))),
        })
        .collect();
    for_each(lanes, |piece| match piece {
        ByDtype::Single(lanes) => masked(lanes, keep),
        ByDtype::Double(lanes) => masked(lanes, keep),
    });
}

/// An output buffer and the gradient.
pub type FisherSource<'a, T> = (&'a mut [T], &'a [T]);
pub type FisherItem<'a> = ByDtype<FisherSource<'a, f32>, FisherSource<'a, f64>>;

fn fisher_pass<T: Real>((out, g): FisherSource<'_, T>, eta: f64) {
    let n = out.len();
    let g = &g[..n];
    for i in 0..n {
        let x = g[i].to_f64();
        out[i] = T::from_f64(x / (1.0 + eta * x * x));
    }
}

/// `out ← g / (1 + η·g²)` for every item: the gradient in Fisher SAM's metric.
pub fn fisher(items: Vec<FisherItem<'_>>, eta: f64) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => fisher_pass(lanes, eta),
        ByDtype::Double(lanes) => fisher_pass(lanes, eta),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centralize_removes_row_means_in_either_order() {
        // A 2×3 array [[1, 2, 3], [4, 6, 8]] in C order and in Fortran order.
        let c = [1.0f64, 2.0, 3.0, 4.0, 6.0, 8.0];
        let f = [1.0f64, 4.0, 2.0, 6.0, 3.0, 8.0];
        let (mut out_c, mut out_f) = ([0.0f64; 6], [0.0f64; 6]);
        let rows = |fortran| Rows::of(&[2, 3], fortran);
        centralize(vec![
            ByDtype::Double((&mut out_c, &c, rows(false))),
            ByDtype::Double((&mut out_f, &f, rows(true))),
        ]);
        assert_eq!(out_c, [-1.0, 0.0, 1.0, -2.0, 0.0, 2.0]);
        assert_eq!(out_f, [-1.0, -2.0, 0.0, 0.0, 1.0, 2.0]);
    }

    #[test]
    fn fisher_divides_by_one_plus_eta_g_squared() {
        let g = [2.0f64, -1.0, 0.0];
        let mut out = [9.0f64; 3];
        fisher(vec![ByDtype::Double((&mut out, &g))], 0.5);
        assert_eq!(out, [2.0 / 3.0, -1.0 / 1.5, 0.0]);
    }

    #[test]
    fn vectors_are_not_centralised() {
        let g = [1.0f32, 2.0];
        let mut out = [0.0f32; 2];
        centralize(vec![ByDtype::Single((&mut out, &g, Rows::of(&[2], false)))]);
        assert_eq!(out, g);
    }

    #[test]
    fn the_mask_keeps_about_a_fraction_and_follows_the_index_only() {
        let g = vec![1.0f64; 100_000];
        let mut out = vec![0.0f64; 100_000];
        let key = draw_key(7, 3, name_key("w"));
        mask(vec![ByDtype::Double((&mut out, &g, key))], 0.3);
        let kept = out.iter().filter(|&&x| x == 1.0).count();
        assert!((29_000..31_000).contains(&kept), "{kept}");
        // The same draws cut anywhere.
        let mut head = vec![0.0f64; 12_345];
        let lanes = (&mut head[..], &g[..12_345], Offset(0), Whole(key));
        let (a, b) = lanes.split_at(5_000);
        masked(b, 0.3);
        masked(a, 0.3);
        assert_eq!(head, out[..12_345]);
    }
}
