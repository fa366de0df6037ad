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
//! - `noise`, `divide`, `bsam_update` (bSAM, Möllenhoff & Khan ICLR 2023): the
//!   posterior sample's noise `n/√(N·s)` (`n ~ N(0, 1)` by Box–Muller from the same
//!   generator), the ascent's `g/s`, and the fused update of m, w and s.
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

/// An output buffer, bSAM's precision `s` and the key of the array's draw.
pub type NoiseSource<'a, T> = (&'a mut [T], &'a [T], u64);
pub type NoiseItem<'a> = ByDtype<NoiseSource<'a, f32>, NoiseSource<'a, f64>>;

type NoiseLanes<'a, T> = (&'a mut [T], &'a [T], Offset, Whole<u64>);

/// Element `index`'s standard normal number under `key` (Box–Muller on its two uniform
/// numbers, `2·index` and `2·index + 1`).
#[inline(always)]
pub fn normal(key: u64, index: u64) -> f64 {
    let (u1, u2) = (uniform(key, 2 * index), uniform(key, 2 * index + 1));
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn noise_pass<T: Real>((out, s, Offset(start), Whole(key)): NoiseLanes<'_, T>, data: f64) {
    let n = out.len();
    let s = &s[..n];
    for i in 0..n {
        let z = normal(key, (start + i) as u64);
        out[i] = T::from_f64(z / (data * s[i].to_f64()).sqrt());
    }
}

/// `out ← n/√(N·s)` for every item: bSAM's sample of the posterior around w.
pub fn noise(items: Vec<NoiseItem<'_>>, data: f64) {
    let lanes: Vec<_> = items
        .into_iter()
        .map(|item| match item {
            ByDtype::Single((out, s, key)) => ByDtype::Single((out, s, Offset(0), Whole(key))),
            ByDtype::Double((out, s, key)) => ByDtype::Double((out, s, Offset(0), Whole(key))),
        })
        .collect();
    for_each(lanes, |piece| match piece {
        ByDtype::Single(lanes) => noise_pass(lanes, data),
        ByDtype::Double(lanes) => noise_pass(lanes, data),
    });
}

/// An output buffer, the gradient and bSAM's precision `s`.
pub type DivideLanes<'a, T> = (&'a mut [T], &'a [T], &'a [T]);
pub type DivideItem<'a> = ByDtype<DivideLanes<'a, f32>, DivideLanes<'a, f64>>;

fn divide_pass<T: Real>((out, g, s): DivideLanes<'_, T>) {
    let n = out.len();
    let (g, s) = (&g[..n], &s[..n]);
    for i in 0..n {
        out[i] = T::from_f64(g[i].to_f64() / s[i].to_f64());
    }
}

/// `out ← g/s` for every item: bSAM's ascent direction.
pub fn divide(items: Vec<DivideItem<'_>>) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => divide_pass(lanes),
        ByDtype::Double(lanes) => divide_pass(lanes),
    });
}

/// bSAM's hyperparameters: learning rate α, β1, β2, the prior's precision per datum δ
/// (weight decay) and the damping γ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BsamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub delta: f64,
    pub damping: f64,
}

/// The parameter w, the gradient at the ascent's point g_ε, the momentum m, the gradient
/// at the noisy sample g, the precision s, and the parameter's group (its `BsamHyper`).
pub type UpdateStreams<'a, T> = (
    &'a mut [T],
    &'a [T],
    &'a mut [T],
    &'a [T],
    &'a mut [T],
    Whole<u32>,
);
pub type BsamItem<'a> = ByDtype<UpdateStreams<'a, f32>, UpdateStreams<'a, f64>>;

fn bsam_pass<T: Real>((w, ge, m, g, s, Whole(group)): UpdateStreams<'_, T>, hypers: &[BsamHyper]) {
    let h = hypers[group as usize];
    let n = w.len();
    let (ge, m, g, s) = (&ge[..n], &mut m[..n], &g[..n], &mut s[..n]);
    for i in 0..n {
        let (wi, si) = (w[i].to_f64(), s[i].to_f64());
        let mi = h.beta1 * m[i].to_f64() + (1.0 - h.beta1) * (ge[i].to_f64() + h.delta * wi);
        m[i] = T::from_f64(mi);
        w[i] = T::from_f64(wi - h.lr * mi / si);
        let curvature = si.sqrt() * g[i].to_f64().abs() + h.damping + h.delta;
        s[i] = T::from_f64(h.beta2 * si + (1.0 - h.beta2) * curvature);
    }
}

/// One bSAM update for every item, each element's streams read and written once, with
/// its parameter group's hyperparameters (`hypers[group]`):
/// `m ← β1·m + (1−β1)·(g_ε + δ·w) ; w ← w − α·m/s ; s ← β2·s + (1−β2)·(√s·|g| + γ + δ)`
/// (w and s of the step's start on the right-hand sides).
pub fn bsam_update(items: Vec<BsamItem<'_>>, hypers: &[BsamHyper]) {
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => bsam_pass(lanes, hypers),
        ByDtype::Double(lanes) => bsam_pass(lanes, hypers),
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
    fn normals_have_unit_variance() {
        let key = draw_key(1, 2, 3);
        let z: Vec<f64> = (0..200_000).map(|i| normal(key, i)).collect();
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / z.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
    }

    #[test]
    fn bsam_update_uses_the_start_values_and_each_group_its_own() {
        let h = BsamHyper {
            lr: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            delta: 0.01,
            damping: 0.1,
        };
        let other = BsamHyper { lr: 0.25, ..h };
        let (mut w, mut m, mut s) = ([2.0f64], [0.5f64], [4.0f64]);
        let (mut w2, mut m2, mut s2) = ([2.0f64], [0.5f64], [4.0f64]);
        bsam_update(
            vec![
                ByDtype::Double((&mut w, &[1.0], &mut m, &[-3.0], &mut s, Whole(0))),
                ByDtype::Double((&mut w2, &[1.0], &mut m2, &[-3.0], &mut s2, Whole(1))),
            ],
            &[h, other],
        );
        let m1 = 0.9 * 0.5 + 0.1 * (1.0 + 0.01 * 2.0);
        assert_eq!(m, [m1]);
        assert_eq!(w, [2.0 - 0.5 * m1 / 4.0]);
        assert_eq!(s, [0.99 * 4.0 + 0.01 * (2.0 * 3.0 + 0.1 + 0.01)]);
        assert_eq!((m2, s2), (m, s));
        assert_eq!(w2, [2.0 - 0.25 * m1 / 4.0]);
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
