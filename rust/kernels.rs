//! Fused element-wise updates over flat slices. Each element's streams are read and written
//! once; arithmetic is done in f64 whatever the storage type, and rounded once on store.

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

/// Gradient clipping, resolved to what happens to one element once the global norm is
/// known: `g ↦ clamp(g·factor, −limit, limit)`. Off is factor 1 and an infinite limit, both
/// exact no-ops on finite values, so every update runs one branch-free loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    factor: f64,
    limit: f64,
}

impl Clip {
    pub const OFF: Clip = Clip {
        factor: 1.0,
        limit: f64::INFINITY,
    };

    /// Clamp every element to `[-limit, limit]`.
    pub fn value(limit: f64) -> Clip {
        Clip { factor: 1.0, limit }
    }

    /// Scale every element (norm clipping: `c/‖g‖`).
    pub fn scale(factor: f64) -> Clip {
        Clip {
            factor,
            limit: f64::INFINITY,
        }
    }

    #[inline(always)]
    fn apply(self, g: f64) -> f64 {
        (g * self.factor).max(-self.limit).min(self.limit)
    }
}

/// GSAM's surrogate-gap-guided gradient `a·g + b·g0` (with `g` the gradient at the
/// perturbed point and `g0` the one at the original point), used when a kernel gets `g0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub a: WideFactor,
    pub b: f64,
}

impl Mix {
    pub const PLAIN: Mix = Mix {
        a: WideFactor::ONE,
        b: 0.0,
    };
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
    pub fn ratio_scaled(numerator: f64, mantissa: f64, exponent: i32) -> WideFactor {
        if exponent == 0 {
            return WideFactor::ratio(numerator, mantissa);
        }
        let shift = (-exponent).clamp(-2044, 2044);
        let half = shift / 2;
        WideFactor {
            mantissa: numerator / mantissa,
            pre: (pow2(half), pow2(shift - half)),
        }
    }

    #[inline(always)]
    pub fn apply(self, x: f64) -> f64 {
        x * self.pre.0 * self.pre.1 * self.mantissa
    }
}

/// `2^e` for `e` in f64's normal exponent range.
pub(crate) fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// The gradient an update uses at element `i`: mixed with `g0` for GSAM, then clipped.
/// Without GSAM, `g0` is `g` itself and the mix `1·g + 0·g`, exactly `g` for finite values:
/// one loop serves both, and reading `g` twice costs no memory traffic.
#[inline(always)]
fn gradient_at<T: Real>(g: &[T], g0: &[T], mix: Mix, clip: Clip, i: usize) -> f64 {
    clip.apply(mix.a.apply(g[i].to_f64()) + mix.b * g0[i].to_f64())
}

/// Whether the update's gradient is `g` itself: no clipping and no mix. `gradient_at` then
/// returns exactly `g[i]` for the finite values an update is given, so a kernel may skip
/// its eight operations per element.
fn is_plain(mix: Mix, clip: Clip) -> bool {
    mix == Mix::PLAIN && clip == Clip::OFF
}

use crate::norm::Norm;

/// Runs a kernel body compiled for the widest vectors the CPU has: AVX-512, else AVX2, else
/// as compiled (wheels target baseline x86-64). Only the vector width changes, never the
/// operations (Rust never fuses a multiply and an add), so the results are bitwise the same
/// on every machine.
macro_rules! widest {
    ($body:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU supports AVX-512 F and VL, checked just above.
                return unsafe { $body::avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { $body::avx2($($arg),*) };
            }
        }
        $body::portable($($arg),*)
    }};
}

/// Declares a kernel body once and compiles it three times: portable, with AVX2 and with
/// AVX-512 enabled (`widest!` picks one).
macro_rules! kernel_body {
    ($name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            // Index loops over slices cut to one length vectorise without bounds checks.
            #[allow(clippy::needless_range_loop)]
            #[inline(always)]
            fn body<$t: $bound>($($arg: $ty),*) $(-> $ret)? $body

            pub(super) fn portable<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            pub(super) unsafe fn avx2<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl")]
            pub(super) unsafe fn avx512<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
        }
    };
}

/// GSAM's mix for `g1 − α·g0⊥`, where `g0⊥ = g0 − (g0·g1/‖g1‖²)·g1` is the part of `g0`
/// orthogonal to `g1`: `a = 1 + α·(g0·g1)/‖g1‖² = (n1 + α·n0·cos)/n1`, `b = −α`. Takes the
/// norms `n0 = ‖g0‖`, `n1 = ‖g1‖` and `cos = (g0·g1)/(n0·n1)`, which keeps every
/// intermediate in range (`a` itself may not be: it is a `WideFactor`).
pub fn gsam_mix(alpha: f64, n0: f64, n1: Norm, cos: f64) -> Mix {
    let a = if n1.mantissa > 0.0 {
        WideFactor::ratio_scaled(n1.value() + alpha * n0 * cos, n1.mantissa, n1.exponent)
    } else {
        WideFactor::ONE
    };
    Mix { a, b: -alpha }
}

/// `‖a·g1 + b·g0‖` for GSAM's mix, from the same numbers, scaled so it cannot overflow.
pub fn mixed_norm(alpha: f64, n0: f64, n1: f64, cos: f64) -> f64 {
    // a·n1 = n1 + α·n0·cos (or n1 when n1 = 0); b = −α.
    let along = n1 + alpha * n0 * cos;
    let (x, y) = (along.abs(), alpha * n0);
    let largest = x.max(y);
    if largest == 0.0 {
        return 0.0;
    }
    let (x, y) = (x / largest, y / largest);
    let sign = -along.signum();
    largest * (x * x + 2.0 * sign * x * y * cos + y * y).max(0.0).sqrt()
}

/// The output buffer, the gradient at the perturbed point and `g0`.
pub type MixLanes<'a, T> = (&'a mut [T], &'a [T], &'a [T]);

/// `out ← a·g + b·g0`: GSAM's gradient, materialised for a base optimizer written in Python.
pub fn mix_into<T: Real>((out, g, g0): MixLanes<'_, T>, mix: Mix) {
    let n = out.len();
    let (g, g0) = (&g[..n], &g0[..n]);
    for i in 0..n {
        out[i] = T::from_f64(mix.a.apply(g[i].to_f64()) + mix.b * g0[i].to_f64());
    }
}

/// Parameter, gradient, velocity, where the step starts from (`None`: the parameter itself;
/// `Some(saved)`: SAM's saved value, so the restore costs no pass of its own), and GSAM's
/// `g0` when the gradient is mixed.
pub type SgdLanes<'a, T> = (
    &'a mut [T],
    &'a [T],
    &'a mut [T],
    Option<&'a [T]>,
    Option<&'a [T]>,
);

#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub clip: Clip,
    pub mix: Mix,
}

/// `v ← μ·v + lr·g ; p ← p_start − v`.
pub fn sgd<T: Real>(lanes: SgdLanes<'_, T>, step: &SgdStep) {
    widest!(sgd_body(lanes, step))
}

kernel_body!(sgd_body<T: Real>(lanes: SgdLanes<'_, T>, step: &SgdStep) {
    let (p, g, velocity, start, g0) = lanes;
    let n = p.len();
    let (g, velocity) = (&g[..n], &mut velocity[..n]);
    let g0 = g0.map_or(g, |s| &s[..n]);
    if is_plain(step.mix, step.clip) {
        sgd_loop(p, velocity, start, |i| g[i].to_f64(), step);
    } else {
        sgd_loop(p, velocity, start, |i| gradient_at(g, g0, step.mix, step.clip, i), step);
    }
});

/// SGD over one piece with the gradient of element `i` given by `grad`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn sgd_loop<T: Real>(
    p: &mut [T],
    velocity: &mut [T],
    start: Option<&[T]>,
    grad: impl Fn(usize) -> f64,
    step: &SgdStep,
) {
    let n = p.len();
    let velocity = &mut velocity[..n];
    match start {
        Some(start) => {
            let start = &start[..n];
            for i in 0..n {
                let vi = step.momentum * velocity[i].to_f64() + step.lr * grad(i);
                velocity[i] = T::from_f64(vi);
                p[i] = T::from_f64(start[i].to_f64() - vi);
            }
        }
        None => {
            for i in 0..n {
                let vi = step.momentum * velocity[i].to_f64() + step.lr * grad(i);
                velocity[i] = T::from_f64(vi);
                p[i] = T::from_f64(p[i].to_f64() - vi);
            }
        }
    }
}

/// Parameter, gradient, first moment, second moment, start and `g0` (as for SGD).
pub type AdamLanes<'a, T> = (
    &'a mut [T],
    &'a [T],
    &'a mut [T],
    &'a mut [T],
    Option<&'a [T]>,
    Option<&'a [T]>,
);

#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// The bias-corrected step size `lr·√(1−β2^t)/(1−β1^t)`.
    pub lr_t: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// `lr·weight_decay` for AdamW's decoupled decay; 0 for Adam.
    pub decay: f64,
    pub clip: Clip,
    pub mix: Mix,
}

/// `m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ; p ← p_start − lr_t·m/(√v+ε) − decay·p_start`.
pub fn adam<T: AdamElement>(lanes: AdamLanes<'_, T>, step: &AdamStep) {
    widest!(adam_body(lanes, step))
}

/// One element of Adam: the new `(p, m, v)` from the start value `p0` and the (clipped,
/// mixed) gradient. Computed in the parameter's own precision: for float32 the square root
/// and the division dominate, and 8-wide f32 arithmetic keeps the kernel memory-bound.
pub trait AdamElement: Real {
    fn adam_element(p0: Self, gi: f64, m: Self, v: Self, step: &AdamStep) -> (Self, Self, Self);
}

impl AdamElement for f64 {
    #[inline(always)]
    fn adam_element(p0: f64, gi: f64, m: f64, v: f64, step: &AdamStep) -> (f64, f64, f64) {
        let m = step.beta1 * m + (1.0 - step.beta1) * gi;
        let v = step.beta2 * v + (1.0 - step.beta2) * gi * gi;
        let p = p0 - step.lr_t * m / (v.sqrt() + step.epsilon) - step.decay * p0;
        (p, m, v)
    }
}

impl AdamElement for f32 {
    #[inline(always)]
    fn adam_element(p0: f32, gi: f64, m: f32, v: f32, step: &AdamStep) -> (f32, f32, f32) {
        let g = gi as f32;
        let (b1, b2) = (step.beta1 as f32, step.beta2 as f32);
        let (c1, c2) = ((1.0 - step.beta1) as f32, (1.0 - step.beta2) as f32);
        let m = b1 * m + c1 * g;
        let v = b2 * v + c2 * g * g;
        let p =
            p0 - step.lr_t as f32 * m / (v.sqrt() + step.epsilon as f32) - step.decay as f32 * p0;
        (p, m, v)
    }
}

kernel_body!(adam_body<T: AdamElement>(lanes: AdamLanes<'_, T>, step: &AdamStep) {
    let (p, g, m, v, start, g0) = lanes;
    let n = p.len();
    let g = &g[..n];
    let g0 = g0.map_or(g, |s| &s[..n]);
    if is_plain(step.mix, step.clip) {
        adam_loop(p, m, v, start, |i| g[i].to_f64(), step);
    } else {
        adam_loop(p, m, v, start, |i| gradient_at(g, g0, step.mix, step.clip, i), step);
    }
});

/// Adam over one piece with the gradient of element `i` given by `grad`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn adam_loop<T: AdamElement>(
    p: &mut [T],
    m: &mut [T],
    v: &mut [T],
    start: Option<&[T]>,
    grad: impl Fn(usize) -> f64,
    step: &AdamStep,
) {
    let n = p.len();
    let (m, v) = (&mut m[..n], &mut v[..n]);
    match start {
        Some(start) => {
            let start = &start[..n];
            for i in 0..n {
                (p[i], m[i], v[i]) = T::adam_element(start[i], grad(i), m[i], v[i], step);
            }
        }
        None => {
            for i in 0..n {
                (p[i], m[i], v[i]) = T::adam_element(p[i], grad(i), m[i], v[i], step);
            }
        }
    }
}

/// Parameter, gradient, the buffer that receives the parameter's value before the move,
/// and (GSAM) a buffer that keeps the gradient.
pub type PerturbLanes<'a, T> = (&'a mut [T], &'a [T], &'a mut [T], Option<&'a mut [T]>);

/// SAM's ascent `e`: plain `ρ·g/n`, or adaptive `ρ·T²⊙g/n` with `T = |p| + eta`.
#[derive(Clone, Copy, Debug)]
pub enum Ascent {
    /// `ρ/n`.
    Plain { scale: WideFactor },
    /// `ρ/n` and eta.
    Adaptive { scale: WideFactor, eta: f64 },
}

/// `saved ← p ; p ← p + e` (and `kept ← g`).
pub fn perturb<T: Real>(lanes: PerturbLanes<'_, T>, ascent: &Ascent) {
    widest!(perturb_body(lanes, ascent))
}

kernel_body!(perturb_body<T: Real>(lanes: PerturbLanes<'_, T>, ascent: &Ascent) {
    let (p, g, saved, kept) = lanes;
    let n = p.len();
    let (g, saved) = (&g[..n], &mut saved[..n]);
    match *ascent {
        Ascent::Plain { scale } => {
            for i in 0..n {
                saved[i] = p[i];
                p[i] = T::from_f64(p[i].to_f64() + scale.apply(g[i].to_f64()));
            }
        }
        Ascent::Adaptive { scale, eta } => {
            for i in 0..n {
                saved[i] = p[i];
                let pi = p[i].to_f64();
                let t = pi.abs() + eta;
                // Scaled first: a subnormal g times T² would lose bits before the scale.
                p[i] = T::from_f64(pi + scale.apply(g[i].to_f64()) * (t * t));
            }
        }
    }
    if let Some(kept) = kept {
        kept.copy_from_slice(g);
    }
});

/// Parameter and its saved value.
pub type RestoreLanes<'a, T> = (&'a mut [T], &'a mut [T]);

/// `p ← saved`, bit for bit.
pub fn restore<T: Real>((p, saved): RestoreLanes<'_, T>) {
    p.copy_from_slice(&saved[..p.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_matches_formula_and_starts_from_saved() {
        let mut p = [1.0f64, -2.0];
        let g = [0.5f64, 4.0];
        let mut vel = [0.1f64, 0.0];
        let saved = [10.0f64, 20.0];
        let step = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            clip: Clip::value(1.0),
            mix: Mix::PLAIN,
        };
        sgd((&mut p, &g, &mut vel, Some(&saved), None), &step);
        let v0 = 0.9 * 0.1 + 0.1 * 0.5;
        let v1 = 0.1 * 1.0;
        assert_eq!(vel, [v0, v1]);
        assert_eq!(p, [10.0 - v0, 20.0 - v1]);
    }

    #[test]
    fn adamw_matches_formula() {
        let (lr, wd, b1, b2, eps) = (0.01, 0.1, 0.9, 0.999, 1e-8);
        let lr_t = lr * (1.0f64 - b2).sqrt() / (1.0 - b1);
        let mut p = [2.0f64];
        let g = [3.0f64];
        let (mut m, mut v) = ([0.0f64], [0.0f64]);
        let step = AdamStep {
            lr_t,
            beta1: b1,
            beta2: b2,
            epsilon: eps,
            decay: lr * wd,
            clip: Clip::scale(0.5),
            mix: Mix::PLAIN,
        };
        adam((&mut p, &g, &mut m, &mut v, None, None), &step);
        let gc = 1.5;
        let (m1, v1) = ((1.0 - b1) * gc, (1.0 - b2) * gc * gc);
        assert_eq!(m[0], m1);
        assert_eq!(v[0], v1);
        let expected = 2.0 - lr_t * m1 / (v1.sqrt() + eps) - lr * wd * 2.0;
        assert!((p[0] - expected).abs() <= 1e-15 * expected.abs());
    }

    #[test]
    fn f32_storage_computes_in_f64_and_rounds_once() {
        let mut p = [1.0f32];
        let g = [1.0e-8f32];
        let mut vel = [0.0f32];
        let step = SgdStep {
            lr: 1.0,
            momentum: 0.0,
            clip: Clip::OFF,
            mix: Mix::PLAIN,
        };
        sgd((&mut p, &g, &mut vel, None, None), &step);
        assert_eq!(p[0], (1.0f64 - f64::from(1.0e-8f32)) as f32);
    }

    #[test]
    fn perturb_then_restore_is_bitwise_exact() {
        let original: Vec<f32> = (0..101).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let g: Vec<f32> = (0..101).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut p = original.clone();
        let mut saved = vec![0.0f32; 101];
        let mut kept = vec![0.0f32; 101];
        perturb(
            (&mut p, &g, &mut saved, Some(&mut kept)),
            &Ascent::Adaptive {
                scale: WideFactor::ratio(0.05, 1.0),
                eta: 0.01,
            },
        );
        assert_ne!(p, original);
        assert_eq!(kept, g);
        restore((&mut p, &mut saved));
        assert_eq!(p, original);
    }

    #[test]
    fn mixed_gradient_is_clipped_after_mixing() {
        let mut p = [0.0f64];
        let (g, g0) = ([2.0f64], [4.0f64]);
        let mut vel = [0.0f64];
        let mix = Mix {
            a: WideFactor::ratio(1.5, 1.0),
            b: -0.5,
        };
        let step = SgdStep {
            lr: 1.0,
            momentum: 0.0,
            clip: Clip::value(0.75),
            mix,
        };
        sgd((&mut p, &g, &mut vel, None, Some(&g0)), &step);
        // 1.5·2 − 0.5·4 = 1, clamped to 0.75.
        assert_eq!(p, [-0.75]);
    }

    #[test]
    fn gsam_mix_removes_alpha_times_the_orthogonal_part() {
        let g1 = [3.0f64, 0.0];
        let g0 = [1.0f64, 2.0];
        let (n0, n1) = (5.0f64.sqrt(), 3.0);
        let cos = 3.0 / (n0 * n1);
        let mix = gsam_mix(0.4, n0, Norm::of(n1), cos);
        let mut out = [0.0f64; 2];
        mix_into((&mut out, &g1, &g0), mix);
        // g0⊥ = (0, 2): the direction is g1 − 0.4·(0, 2).
        assert!(
            (out[0] - 3.0).abs() < 1e-15 && (out[1] + 0.8).abs() < 1e-15,
            "{out:?}"
        );
        let norm = mixed_norm(0.4, n0, n1, cos);
        assert!((norm - (9.0f64 + 0.64).sqrt()).abs() < 1e-14, "{norm}");
        assert_eq!(
            gsam_mix(0.4, n0, Norm::of(0.0), 0.0),
            Mix {
                a: WideFactor::ONE,
                b: -0.4
            }
        );
    }

    #[test]
    fn wide_factor_reaches_beyond_f64_range_exactly_in_range() {
        let tiny = 4e-320; // subnormal: 0.05 / tiny overflows
        let factor = WideFactor::ratio(0.05, tiny);
        let moved = factor.apply(3e-320);
        assert!((moved - 0.05 * 0.75).abs() < 1e-3 * 0.05, "{moved}");
        assert_eq!(WideFactor::ratio(0.05, 2.0).apply(3.0), 3.0 * (0.05 / 2.0));
        // GSAM with a vanishing g1: a = 1 + α·n0·cos/n1 overflows, a·g1 does not.
        let mix = gsam_mix(0.4, 1.0, Norm::of(1e-310), 0.5);
        let d = mix.a.apply(1e-310) + mix.b * 1.0;
        assert!((d - (1e-310 + 0.4 * 0.5 - 0.4)).abs() < 1e-15, "{d}");
    }
}
