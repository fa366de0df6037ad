//! Layer-wise optimizers (LAMB, LARS, AdamP), and Sophia on the same engine without the
//! read pass. LAMB's, LARS's and AdamP's step of each array is scaled by a factor made of
//! sums over that array, so a step is two passes. The read pass computes, without
//! writing anything, per-element quantities of every array and their sums over the array
//! (LAMB: the norms of the parameter and its Adam update; LARS: of the parameter and its
//! gradient; AdamP: those of the parameter and its gradient, and the parameter's dot
//! products with its gradient and its Adam update); the write pass then updates every
//! element with its array's factor. Both passes read the step's starting values — SAM's
//! saved values when the restore is fused in — never the perturbed parameters.
//!
//! The sums are reproducible (pieces of `CHUNK_LEN` elements, partial sums combined in
//! piece order whatever the thread count) and free of spurious overflow or underflow: an
//! array whose sums leave the safe range is summed again, rescaled by powers of two.
//!
//! AdamP first tries its channel view, the same sums per row of the first axis: rows are
//! measured whole by one task each (so whatever the thread count), in a second read pass
//! that stops at an array's first row whose cosine is not small; the write pass of an
//! array projected row by row measures each row again just before writing it, so no
//! per-row memory is kept between the passes.

use crate::float::{pow2, Real};
use crate::kernels::{GradientPlan, GroupStep};
use crate::norm::NormError;
use crate::parallel::{for_each, map_chunks, ByDtype, Lanes, Split};
use crate::phases::{self, Clipping, GsamInputs, WithGradient};
use crate::specs::Hyper;

/// The hyperparameters of a layer-wise optimizer for one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerHyper {
    pub base: Hyper,
    /// LARS's trust coefficient η.
    pub trust_coef: f64,
    /// Sophia's γ (the crate's `rho`), and whether this step refreshes its Hessian
    /// estimate from the step's own gradient (`h ← β2·h + (1−β2)·g²`).
    pub sophia_rho: f64,
    pub refresh_hessian: bool,
    /// AdamP's projection threshold δ and the weight-decay ratio of a projected array.
    pub adamp_delta: f64,
    pub adamp_wd_ratio: f64,
}

/// What the read pass sums over an array for its factor, from an element's three
/// quantities `[a, b, c]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFactor {
    /// `‖a‖` and `‖b‖` (LAMB, LARS).
    Norms,
    /// `‖a‖`, `‖b‖`, `a·b` and `a·c` (AdamP: the parameter, its gradient, its update).
    Cosines,
}

/// An array's (or one row's) sums from the read pass: the norms, the dot products (0 for
/// `LayerFactor::Norms`) and its element count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ArrayMeasures {
    pub norms: [f64; 2],
    pub dots: [f64; 2],
    pub len: usize,
}

/// One element of a layer-wise optimizer. `measure` and `element` get the same starting
/// value `p0`, (clipped, mixed) gradient `g` and state.
pub trait LayerUpdate<T: Real, const N: usize>: Copy + Send + Sync {
    /// What the read pass sums.
    const FACTOR: LayerFactor = LayerFactor::Norms;
    /// The quantities whose sums over the array make its factor (the third only for
    /// `LayerFactor::Cosines`). Reads the state only.
    fn measure(&self, p0: T, g: f64, s: &[T; N]) -> [f64; 3];
    /// The array's factor from those sums; `adapt` false: the array is left out of the
    /// layer-wise adaptation (LARS's excluded biases, AdamP's arrays of fewer than two axes).
    fn factor(&self, measures: &ArrayMeasures, adapt: bool) -> f64;
    /// AdamP's projection: the factor of an array, or of one row of its channel view,
    /// whose gradient is nearly orthogonal to it; `None` when it is not (always, for the
    /// optimizers without one).
    fn projected(&self, _: &ArrayMeasures) -> Option<f64> {
        None
    }
    /// The element's new value with its array's factor, updating its state.
    fn element(&self, p0: T, g: f64, s: &mut [T; N], factor: f64) -> T;
}

/// A layer-wise optimizer with `N` state slots per parameter.
pub trait LayerSpec<const N: usize>: LayerUpdate<f32, N> + LayerUpdate<f64, N> {
    /// The state-dict key prefix of each slot (the crate's names).
    const SLOTS: [&'static str; N];
    /// The scalars of step `t` (the first step is 1).
    fn at_step(hyper: &LayerHyper, t: u64) -> Self;
    /// Whether the factor needs the read pass (false: every factor is 1 and `measure` is
    /// never called).
    const MEASURES: bool = true;
    /// The fewest axes an array needs to take part in the adaptation.
    const MIN_AXES: usize = 0;
    /// Whether an adapted array is first tried row by row (AdamP's channel view), and
    /// measured whole only when some row is not projected.
    const CHANNELS: bool = false;
}

/// LAMB (You et al., ICLR 2020, Algorithm 2 with φ the identity), the crate's form:
/// `m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ; r = m̂/(√v̂ + ε) + λ·p` with the bias
/// corrections `m̂ = m/(1−β1^t)`, `v̂ = v/(1−β2^t)` ; `p ← p − lr·(‖p‖/‖r‖)·r`, the trust
/// ratio `‖p‖/‖r‖` taken as 1 when either norm is 0. The weight decay λ is decoupled
/// (inside `r`, as in the paper).
#[derive(Clone, Copy, Debug)]
pub struct Lamb {
    lr: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    weight_decay: f64,
    /// `1/(1−β1^t)` and `1/(1−β2^t)`.
    correction1: f64,
    correction2: f64,
}

impl Lamb {
    #[inline(always)]
    fn moments<T: Real>(&self, g: f64, [m, v]: &[T; 2]) -> (f64, f64) {
        let m = self.beta1 * m.to_f64() + (1.0 - self.beta1) * g;
        let v = self.beta2 * v.to_f64() + (1.0 - self.beta2) * g * g;
        (m, v)
    }

    #[inline(always)]
    fn direction(&self, p0: f64, m: f64, v: f64) -> f64 {
        (m * self.correction1) / ((v * self.correction2).sqrt() + self.epsilon)
            + self.weight_decay * p0
    }
}

impl LayerSpec<2> for Lamb {
    const SLOTS: [&'static str; 2] = ["m_", "v_"];
    fn at_step(hyper: &LayerHyper, t: u64) -> Lamb {
        let h = &hyper.base;
        let power = t as f64;
        Lamb {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            epsilon: h.epsilon,
            weight_decay: h.weight_decay,
            correction1: 1.0 / (1.0 - h.beta1.powf(power)),
            correction2: 1.0 / (1.0 - h.beta2.powf(power)),
        }
    }
}

impl<T: Real> LayerUpdate<T, 2> for Lamb {
    #[inline(always)]
    fn measure(&self, p0: T, g: f64, s: &[T; 2]) -> [f64; 3] {
        let (m, v) = self.moments(g, s);
        let p0 = p0.to_f64();
        [p0, self.direction(p0, m, v), 0.0]
    }

    fn factor(&self, measures: &ArrayMeasures, adapt: bool) -> f64 {
        let [param, update] = measures.norms;
        let trust = match adapt && param > 0.0 && update > 0.0 {
            true => param / update,
            false => 1.0,
        };
        self.lr * trust
    }

    #[inline(always)]
    fn element(&self, p0: T, g: f64, s: &mut [T; 2], factor: f64) -> T {
        let (m, v) = self.moments(g, s);
        s[0] = T::from_f64(m);
        s[1] = T::from_f64(v);
        let p0 = p0.to_f64();
        T::from_f64(p0 - factor * self.direction(p0, m, v))
    }
}

/// LARS (You, Gitman & Ginsburg, 2017, Algorithm 1): the local learning rate
/// `lr·η·‖p‖/(‖g‖ + λ·‖p‖)` (just `lr` when either norm is 0, or for a parameter left out
/// of the adaptation); `v ← μ·v + local_lr·(g + λ·p) ; p ← p − v`. The weight decay λ is
/// L2, inside the momentum as in the paper.
#[derive(Clone, Copy, Debug)]
pub struct Lars {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    trust_coef: f64,
}

impl LayerSpec<1> for Lars {
    const SLOTS: [&'static str; 1] = ["velocity_"];
    fn at_step(hyper: &LayerHyper, _: u64) -> Lars {
        Lars {
            lr: hyper.base.lr,
            momentum: hyper.base.momentum,
            weight_decay: hyper.base.weight_decay,
            trust_coef: hyper.trust_coef,
        }
    }
}

impl<T: Real> LayerUpdate<T, 1> for Lars {
    #[inline(always)]
    fn measure(&self, p0: T, g: f64, _: &[T; 1]) -> [f64; 3] {
        [p0.to_f64(), g, 0.0]
    }

    fn factor(&self, measures: &ArrayMeasures, adapt: bool) -> f64 {
        let [param, grad] = measures.norms;
        match adapt && param > 0.0 && grad > 0.0 {
            true => self.lr * self.trust_coef * param / (grad + self.weight_decay * param),
            false => self.lr,
        }
    }

    #[inline(always)]
    fn element(&self, p0: T, g: f64, [v]: &mut [T; 1], factor: f64) -> T {
        let p0 = p0.to_f64();
        let velocity = self.momentum * v.to_f64() + factor * (g + self.weight_decay * p0);
        *v = T::from_f64(velocity);
        T::from_f64(p0 - velocity)
    }
}

/// AdamP (Heo et al., ICLR 2021, Algorithm 2 as the authors' code writes it):
/// `m ← β1·m + (1−β1)·g ; v ← β2·v + (1−β2)·g² ;
/// u = m_n/(√v/√(1−β2^t) + ε)` with `m_n = β1·m + (1−β1)·g` (Nesterov) or `m` ; an array
/// of two or more axes is scale-invariant in its channel view when every row `c` of its
/// first axis has `|cos(g_c, p_c)| < δ/√(len/rows)`: each row's update loses its radial
/// part, `u_c ← u_c − p̂_c·(p̂_c·u_c)` with `p̂_c = p_c/(‖p_c‖ + ε)`; failing that, in its
/// layer view when `|cos(g, p)| < δ/√len`: `u ← u − p̂·(p̂·u)` with `p̂ = p/(‖p‖ + ε)`.
/// A projected array's weight decay is scaled by `wd_ratio` ;
/// `p ← p·(1 − lr·wd·r) − lr/(1−β1^t)·u` (`r` = `wd_ratio` or 1). The weight decay is
/// decoupled, from the step's starting value. An array's (or row's) factor is its decay
/// coefficient with the projection folded in: `p ← p·(1 − factor) − step·u`.
#[derive(Clone, Copy, Debug)]
pub struct AdamP {
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    nesterov: bool,
    /// `lr/(1−β1^t)` and `1/√(1−β2^t)`.
    step_size: f64,
    correction2: f64,
    /// `lr·wd`.
    decay: f64,
    delta: f64,
    wd_ratio: f64,
}

impl AdamP {
    #[inline(always)]
    fn moments<T: Real>(&self, g: f64, [m, v]: &[T; 2]) -> (f64, f64) {
        let m = self.beta1 * m.to_f64() + (1.0 - self.beta1) * g;
        let v = self.beta2 * v.to_f64() + (1.0 - self.beta2) * g * g;
        (m, v)
    }

    #[inline(always)]
    fn direction(&self, g: f64, m: f64, v: f64) -> f64 {
        let numerator = match self.nesterov {
            true => self.beta1 * m + (1.0 - self.beta1) * g,
            false => m,
        };
        numerator / (v.sqrt() * self.correction2 + self.epsilon)
    }
}

impl LayerSpec<2> for AdamP {
    const SLOTS: [&'static str; 2] = ["m_", "v_"];
    // The paper projects weights only (`len(p.shape) > 1`): never biases or gains.
    const MIN_AXES: usize = 2;
    const CHANNELS: bool = true;
    fn at_step(hyper: &LayerHyper, t: u64) -> AdamP {
        let h = &hyper.base;
        let power = t as f64;
        AdamP {
            beta1: h.beta1,
            beta2: h.beta2,
            epsilon: h.epsilon,
            nesterov: h.nesterov,
            step_size: h.lr / (1.0 - h.beta1.powf(power)),
            correction2: 1.0 / (1.0 - h.beta2.powf(power)).sqrt(),
            decay: h.lr * h.weight_decay,
            delta: hyper.adamp_delta,
            wd_ratio: hyper.adamp_wd_ratio,
        }
    }
}

impl<T: Real> LayerUpdate<T, 2> for AdamP {
    const FACTOR: LayerFactor = LayerFactor::Cosines;

    #[inline(always)]
    fn measure(&self, p0: T, g: f64, s: &[T; 2]) -> [f64; 3] {
        let (m, v) = self.moments(g, s);
        [p0.to_f64(), g, self.direction(g, m, v)]
    }

    fn factor(&self, measures: &ArrayMeasures, adapt: bool) -> f64 {
        match adapt {
            true => <Self as LayerUpdate<T, 2>>::projected(self, measures).unwrap_or(self.decay),
            false => self.decay,
        }
    }

    fn projected(&self, measures: &ArrayMeasures) -> Option<f64> {
        let [param, grad] = measures.norms;
        let [param_grad, param_update] = measures.dots;
        let eps = self.epsilon;
        // PyTorch's cosine_similarity, which the authors' code calls.
        let cosine = param_grad.abs() / (param.max(eps) * grad.max(eps));
        (cosine < self.delta / (measures.len as f64).sqrt()).then(|| {
            // Divided twice: the square of a norm near f64's limit would overflow.
            let unit = param + eps;
            self.decay * self.wd_ratio - self.step_size * (param_update / unit) / unit
        })
    }

    #[inline(always)]
    fn element(&self, p0: T, g: f64, s: &mut [T; 2], factor: f64) -> T {
        let (m, v) = self.moments(g, s);
        s[0] = T::from_f64(m);
        s[1] = T::from_f64(v);
        let p0 = p0.to_f64();
        T::from_f64(p0 - factor * p0 - self.step_size * self.direction(g, m, v))
    }
}

/// Sophia (Liu, Li, Hall, Liang & Ma, 2023, Algorithm 3): `m ← β1·m + (1−β1)·g ;
/// p ← p − lr·wd·p − lr·clip(m/max(γ·h, ε), −1, 1)`, with `h` the EMA of Hessian-diagonal
/// estimates (`sophia_hessian`, or `h ← β2·h + (1−β2)·g²` on a refreshing step). Weight
/// decay is decoupled, from the step's starting value. Element-wise: no read pass.
#[derive(Clone, Copy, Debug)]
pub struct Sophia {
    lr: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    rho: f64,
    decay: f64,
    refresh: bool,
}

impl LayerSpec<2> for Sophia {
    const SLOTS: [&'static str; 2] = ["m_", "h_"];
    const MEASURES: bool = false;
    fn at_step(hyper: &LayerHyper, _: u64) -> Sophia {
        let h = &hyper.base;
        Sophia {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            epsilon: h.epsilon,
            rho: hyper.sophia_rho,
            decay: h.lr * h.weight_decay,
            refresh: hyper.refresh_hessian,
        }
    }
}

impl<T: Real> LayerUpdate<T, 2> for Sophia {
    fn measure(&self, _: T, _: f64, _: &[T; 2]) -> [f64; 3] {
        [0.0; 3]
    }

    fn factor(&self, _: &ArrayMeasures, _: bool) -> f64 {
        1.0
    }

    #[inline(always)]
    fn element(&self, p0: T, g: f64, [m, h]: &mut [T; 2], _: f64) -> T {
        let moment = self.beta1 * m.to_f64() + (1.0 - self.beta1) * g;
        *m = T::from_f64(moment);
        let mut curvature = h.to_f64();
        if self.refresh {
            curvature = self.beta2 * curvature + (1.0 - self.beta2) * g * g;
            *h = T::from_f64(curvature);
        }
        let ratio = (moment / (self.rho * curvature).max(self.epsilon)).clamp(-1.0, 1.0);
        let p0 = p0.to_f64();
        T::from_f64(p0 - self.decay * p0 - self.lr * ratio)
    }
}

/// A parameter's Hessian-diagonal EMA (Sophia's `h_`), the estimate given for it and its
/// group.
pub type HessianLanes<'a, T> = (&'a mut [T], &'a [T], u32);
pub type HessianItem<'a> = ByDtype<HessianLanes<'a, f32>, HessianLanes<'a, f64>>;

/// `h ← β2·h + (1−β2)·ĥ` with each group's β2, once every estimate is checked finite.
pub fn sophia_hessian(items: Vec<HessianItem<'_>>, beta2: &[f64]) -> Result<(), NormError> {
    let estimates: Vec<crate::norm::NormItem<'_>> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single((_, e, _)) => ByDtype::Single((*e, None)),
            ByDtype::Double((_, e, _)) => ByDtype::Double((*e, None)),
        })
        .collect();
    crate::norm::check_finite(&estimates)?;
    fn blend<T: Real>((h, estimate, group): HessianLanes<'_, T>, beta2: &[f64]) {
        let b = beta2[group as usize];
        let estimate = &estimate[..h.len()];
        for (h, e) in h.iter_mut().zip(estimate) {
            *h = T::from_f64(b * h.to_f64() + (1.0 - b) * e.to_f64());
        }
    }
    for_each(items, |piece| match piece {
        ByDtype::Single(lanes) => blend(lanes, beta2),
        ByDtype::Double(lanes) => blend(lanes, beta2),
    });
    Ok(())
}

/// The rows of an array's first axis (AdamP's channel view): `count` rows of
/// `len/count` elements, row `r` being elements `r·len/count..(r+1)·len/count` in C order
/// and `r, r + count, r + 2·count, …` in Fortran order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub count: usize,
    pub fortran: bool,
}

/// The streams of a layer-wise step over one piece of one parameter: as
/// `kernels::UpdateLanes`, with the parameter's position in the call (`item`, whose norms
/// the piece adds to), whether it takes part in the adaptation, and its rows when it is
/// first tried row by row (`LayerSpec::CHANNELS`).
pub struct LayerLanes<'a, T, const N: usize> {
    pub param: &'a mut [T],
    pub grad: &'a [T],
    pub slots: [&'a mut [T]; N],
    pub start: Option<&'a [T]>,
    pub grad0: Option<&'a [T]>,
    pub group: u32,
    pub item: u32,
    pub adapt: bool,
    pub rows: Option<Rows>,
}

impl<T, const N: usize> Split for LayerLanes<'_, T, N> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (param, param_tail) = Split::split_at(self.param, mid);
        let (grad, grad_tail) = Split::split_at(self.grad, mid);
        let (slots, slots_tail) = Split::split_at(self.slots, mid);
        let (start, start_tail) = Split::split_at(self.start, mid);
        let (grad0, grad0_tail) = Split::split_at(self.grad0, mid);
        let (group, item, adapt, rows) = (self.group, self.item, self.adapt, self.rows);
        let head = LayerLanes {
            param,
            grad,
            slots,
            start,
            grad0,
            group,
            item,
            adapt,
            rows,
        };
        let tail = LayerLanes {
            param: param_tail,
            grad: grad_tail,
            slots: slots_tail,
            start: start_tail,
            grad0: grad0_tail,
            group,
            item,
            adapt,
            rows,
        };
        (head, tail)
    }
}

impl<T: Send + Sync, const N: usize> Lanes for LayerLanes<'_, T, N> {
    fn len(&self) -> usize {
        self.param.len()
    }
}

impl<T, const N: usize> WithGradient<T> for LayerLanes<'_, T, N> {
    fn gradient(&self) -> &[T] {
        self.grad
    }
    fn reference(&self) -> Option<&[T]> {
        self.grad0
    }
}

pub type LayerItem<'a, const N: usize> = ByDtype<LayerLanes<'a, f32, N>, LayerLanes<'a, f64, N>>;

/// The read pass's view of a piece: what `measure` reads.
struct Reading<'a, T, const N: usize> {
    start: &'a [T],
    grad: &'a [T],
    grad0: &'a [T],
    slots: [&'a [T]; N],
    group: u32,
    item: u32,
}

impl<T, const N: usize> Split for Reading<'_, T, N> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (start, start_tail) = Split::split_at(self.start, mid);
        let (grad, grad_tail) = Split::split_at(self.grad, mid);
        let (grad0, grad0_tail) = Split::split_at(self.grad0, mid);
        let (slots, slots_tail) = Split::split_at(self.slots, mid);
        let (group, item) = (self.group, self.item);
        let head = Reading {
            start,
            grad,
            grad0,
            slots,
            group,
            item,
        };
        let tail = Reading {
            start: start_tail,
            grad: grad_tail,
            grad0: grad0_tail,
            slots: slots_tail,
            group,
            item,
        };
        (head, tail)
    }
}

// Shared views only: copied freely (a derive would ask `T: Copy`).
impl<T, const N: usize> Clone for Reading<'_, T, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T, const N: usize> Copy for Reading<'_, T, N> {}

impl<T: Sync, const N: usize> Lanes for Reading<'_, T, N> {
    fn len(&self) -> usize {
        self.start.len()
    }
}

fn reading<'a, T, const N: usize>(lanes: &'a LayerLanes<'_, T, N>) -> Reading<'a, T, N> {
    Reading {
        start: lanes.start.unwrap_or(&*lanes.param),
        grad: lanes.grad,
        grad0: lanes.grad0.unwrap_or(lanes.grad),
        slots: lanes.slots.each_ref().map(|s| &**s),
        group: lanes.group,
        item: lanes.item,
    }
}

/// The gradient an element is updated with: mixed and clipped. No L2 term is added: the
/// layer-wise optimizers apply their weight decay themselves.
#[inline(always)]
fn gradient<T: Real>(plan: GradientPlan, g: T, g0: T) -> f64 {
    plan.gradient(g, g0)
}

/// How one piece's elements are measured: by the fast sums of products, or, in the rescue
/// pass, by the largest magnitude of each quantity and then the sums of products of the
/// quantities scaled by `2^-exponent`.
#[derive(Clone, Copy)]
enum Measure {
    Sums,
    Largest,
    Scaled([i32; 3]),
}

/// The products `kind` sums, padded to four: `[a², b², a·b, a·c]`.
#[inline(always)]
fn products(kind: LayerFactor, [a, b, c]: [f64; 3]) -> [f64; 4] {
    match kind {
        LayerFactor::Norms => [a * a, b * b, 0.0, 0.0],
        LayerFactor::Cosines => [a * a, b * b, a * b, a * c],
    }
}

fn measure_piece<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    lanes: Reading<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    how: Measure,
) -> [f64; 4] {
    widest!(measure_body(lanes, groups, plan, how))
}

kernel_body!(measure_body[T: Real, U: LayerUpdate<T, N>, const N: usize](
    lanes: Reading<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    how: Measure
) -> [f64; 4] {
    let spec = &groups[lanes.group as usize].spec;
    let n = lanes.start.len();
    let (start, grad, grad0) = (lanes.start, &lanes.grad[..n], &lanes.grad0[..n]);
    let slots = lanes.slots.map(|s| &s[..n]);
    let terms = |i: usize| {
        let state: [T; N] = std::array::from_fn(|k| slots[k][i]);
        let g = gradient(plan, grad[i], grad0[i]);
        spec.measure(start[i], g, &state)
    };
    let plain = |i: usize| {
        let state: [T; N] = std::array::from_fn(|k| slots[k][i]);
        spec.measure(start[i], grad[i].to_f64(), &state)
    };
    let raw = |i: usize| grad[i].to_f64();
    match (how, U::FACTOR) {
        // Without clipping or a mix the gradient is `g` itself: skip those operations.
        (Measure::Sums, LayerFactor::Norms) if plan == GradientPlan::PLAIN => pad(sum_products(
            n,
            |i| probed(first_two(products(U::FACTOR, plain(i))), raw(i)),
        )),
        (Measure::Sums, LayerFactor::Norms) => pad(sum_products(n, |i| {
            probed(first_two(products(U::FACTOR, terms(i))), raw(i))
        })),
        (Measure::Sums, LayerFactor::Cosines) if plan == GradientPlan::PLAIN => {
            sum_products(n, |i| probed(products(U::FACTOR, plain(i)), raw(i)))
        }
        (Measure::Sums, LayerFactor::Cosines) => {
            sum_products(n, |i| probed(products(U::FACTOR, terms(i)), raw(i)))
        }
        (Measure::Largest, _) => {
            let largest = (0..n).fold([0.0f64; 3], |acc, i| {
                let q = terms(i);
                std::array::from_fn(|k| acc[k].max(q[k].abs()))
            });
            [largest[0], largest[1], largest[2], 0.0]
        }
        (Measure::Scaled(exponents), kind) => {
            let scales = exponents.map(|e| (pow2(-(e / 2)), pow2(e / 2 - e)));
            let mut acc = [0.0f64; 4];
            for i in 0..n {
                let q = terms(i);
                let scaled = std::array::from_fn(|k| q[k] * scales[k].0 * scales[k].1);
                let p = products(kind, scaled);
                for k in 0..4 {
                    acc[k] += p[k];
                }
            }
            acc
        }
    }
});

/// The products with `0·g` added to the first (a square): the same value for a finite
/// gradient as it arrived (before clipping), NaN for a non-finite one, so the fast sums
/// double as the gradients' finiteness check.
#[inline(always)]
fn probed<const M: usize>(mut products: [f64; M], raw: f64) -> [f64; M] {
    products[0] += raw * 0.0;
    products
}

#[inline(always)]
fn first_two([a, b, _, _]: [f64; 4]) -> [f64; 2] {
    [a, b]
}

#[inline(always)]
fn pad([a, b]: [f64; 2]) -> [f64; 4] {
    [a, b, 0.0, 0.0]
}

/// The sums of `M` products over `n` elements: element i goes to running sum i % 4 of
/// each, a fixed grouping (so a fixed result) in blocks of four that vectorise.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn sum_products<const M: usize>(n: usize, terms: impl Fn(usize) -> [f64; M]) -> [f64; M] {
    let mut acc = [[0.0f64; 4]; M];
    let whole = n - n % 4;
    for block in (0..whole).step_by(4) {
        for k in 0..4 {
            let p = terms(block + k);
            for j in 0..M {
                acc[j][k] += p[j];
            }
        }
    }
    for i in whole..n {
        let p = terms(i);
        for j in 0..M {
            acc[j][i % 4] += p[j];
        }
    }
    acc.map(|s| (s[0] + s[1]) + (s[2] + s[3]))
}

/// Below this a sum of squares may have lost bits to underflow (as in `norm`).
const SMALLEST_SAFE_SUM: f64 = 1.0e-270;

/// `x·2^e` for any exponent of a finite double's magnitude, in two steps that stay in range.
#[inline]
fn unscale(x: f64, e: i32) -> f64 {
    x * pow2(e / 2) * pow2(e - e / 2)
}

/// Per-item sums of `how` over the pieces, combined in piece order.
fn per_item<U, const N: usize>(
    items: &[ByDtype<Reading<'_, f32, N>, Reading<'_, f64, N>>],
    count: usize,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    how: impl Fn(usize) -> Option<Measure> + Sync,
    combine: fn(f64, f64) -> f64,
) -> Vec<[f64; 4]>
where
    U: LayerUpdate<f32, N> + LayerUpdate<f64, N>,
{
    let selected = items.iter().filter_map(|item| {
        let index = match item {
            ByDtype::Single(l) => l.item,
            ByDtype::Double(l) => l.item,
        } as usize;
        how(index).map(|_| match item {
            ByDtype::Single(l) => ByDtype::Single(*l),
            ByDtype::Double(l) => ByDtype::Double(*l),
        })
    });
    let partials = map_chunks(selected, |task| {
        task.map(|piece| match piece {
            ByDtype::Single(l) => {
                let item = l.item as usize;
                let how = how(item).expect("selected");
                (item, measure_piece(l, groups, plan, how))
            }
            ByDtype::Double(l) => {
                let item = l.item as usize;
                let how = how(item).expect("selected");
                (item, measure_piece(l, groups, plan, how))
            }
        })
        .collect::<Vec<_>>()
    });
    let mut totals = vec![[0.0f64; 4]; count];
    for (item, sums) in partials.into_iter().flatten() {
        for k in 0..4 {
            totals[item][k] = combine(totals[item][k], sums[k]);
        }
    }
    totals
}

/// The measures of every item (in the call's item order), reproducibly and without
/// spurious overflow or underflow. `unchecked`: the gradients' finiteness is still to be
/// checked, which a non-finite fast sum then does.
fn array_measures<U, const N: usize>(
    items: &[LayerItem<'_, N>],
    count: usize,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    unchecked: bool,
) -> Result<Vec<ArrayMeasures>, NormError>
where
    U: LayerUpdate<f32, N> + LayerUpdate<f64, N>,
{
    let reads: Vec<ByDtype<Reading<'_, f32, N>, Reading<'_, f64, N>>> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single(l) => ByDtype::Single(reading(l)),
            ByDtype::Double(l) => ByDtype::Double(reading(l)),
        })
        .collect();
    let mut measures = vec![ArrayMeasures::default(); count];
    for read in &reads {
        let (item, len) = match read {
            ByDtype::Single(l) => (l.item, l.len()),
            ByDtype::Double(l) => (l.item, l.len()),
        };
        measures[item as usize].len += len;
    }
    let add = |a: f64, b: f64| a + b;
    let sums = per_item(&reads, count, groups, plan, |_| Some(Measure::Sums), add);
    if unchecked && !sums.iter().flatten().all(|s| s.is_finite()) {
        phases::check_gradients(items)?;
    }
    let rescue: Vec<bool> = sums.iter().map(needs_rescue).collect();
    for (measure, s) in measures.iter_mut().zip(&sums) {
        *measure = from_sums(s, measure.len);
    }
    if !rescue.iter().any(|&r| r) {
        return Ok(measures);
    }
    let pick = |item: usize, how: Measure| rescue[item].then_some(how);
    let largest = per_item(
        &reads,
        count,
        groups,
        plan,
        |i| pick(i, Measure::Largest),
        f64::max,
    );
    let exponents: Vec<[i32; 3]> = largest.iter().map(exponents_of).collect();
    let scaled = per_item(
        &reads,
        count,
        groups,
        plan,
        |i| pick(i, Measure::Scaled(exponents[i])),
        add,
    );
    for item in (0..count).filter(|&i| rescue[i]) {
        let len = measures[item].len;
        measures[item] = rescued(&largest[item], exponents[item], &scaled[item], len);
    }
    Ok(measures)
}

/// Whether fast sums `[a², b², a·b, a·c]` may have overflowed or lost bits to underflow.
/// By Cauchy-Schwarz a dot product is finite when the norms are, and an underflow in it
/// is small beside their product: only the squares decide.
fn needs_rescue(sums: &[f64; 4]) -> bool {
    let safe = |s: f64| s.is_finite() && s >= SMALLEST_SAFE_SUM;
    !(safe(sums[0]) && safe(sums[1]))
}

fn from_sums(s: &[f64; 4], len: usize) -> ArrayMeasures {
    ArrayMeasures {
        norms: [s[0].sqrt(), s[1].sqrt()],
        dots: [s[2], s[3]],
        len,
    }
}

/// The binary exponents the rescue pass scales each quantity by, from its largest
/// magnitude.
fn exponents_of(largest: &[f64; 4]) -> [i32; 3] {
    let exponent = |x: f64| match x > 0.0 && x.is_finite() {
        true => x.log2().floor() as i32,
        false => 0,
    };
    [
        exponent(largest[0]),
        exponent(largest[1]),
        exponent(largest[2]),
    ]
}

/// The measures from the rescue pass: each quantity's largest magnitude, its exponent
/// and the sums of the scaled products.
fn rescued(max: &[f64; 4], e: [i32; 3], s: &[f64; 4], len: usize) -> ArrayMeasures {
    let usable = |x: f64| x > 0.0 && x.is_finite();
    let norm = |k: usize| match usable(max[k]) {
        true => unscale(s[k].sqrt(), e[k]),
        false => max[k],
    };
    let dot = |k: usize, other: usize| match (usable(max[0]), usable(max[other])) {
        (true, true) => unscale(unscale(s[k], e[0]), e[other]),
        _ if max[0] == 0.0 || max[other] == 0.0 => 0.0,
        _ => f64::NAN,
    };
    ArrayMeasures {
        norms: [norm(0), norm(1)],
        dots: [dot(2, 1), dot(3, 2)],
        len,
    }
}

/// An array cut only between whole rows of its channel view, so that one task measures
/// each row whole whatever the cut (and so whatever the thread count); in Fortran order,
/// where the rows interleave, not cut at all.
struct WholeRows<L> {
    lanes: L,
    rows: Rows,
    row_len: usize,
}

impl<L: Lanes> Split for WholeRows<L> {
    fn split_at(self, mid: usize) -> (Self, Self) {
        let len = self.lanes.len();
        let cut = match self.rows.fortran {
            true => len,
            false => ((mid / self.row_len).max(1) * self.row_len).min(len),
        };
        let (head, tail) = self.lanes.split_at(cut);
        let (rows, row_len) = (self.rows, self.row_len);
        let head = WholeRows {
            lanes: head,
            rows,
            row_len,
        };
        let tail = WholeRows {
            lanes: tail,
            rows,
            row_len,
        };
        (head, tail)
    }
}

impl<L: Lanes> Lanes for WholeRows<L> {
    fn len(&self) -> usize {
        self.lanes.len()
    }
}

impl<S, D> WholeRows<ByDtype<S, D>> {
    /// The same rows with the dtype outside, for the typed kernels.
    fn typed(self) -> ByDtype<WholeRows<S>, WholeRows<D>> {
        let (rows, row_len) = (self.rows, self.row_len);
        match self.lanes {
            ByDtype::Single(lanes) => ByDtype::Single(WholeRows {
                lanes,
                rows,
                row_len,
            }),
            ByDtype::Double(lanes) => ByDtype::Double(WholeRows {
                lanes,
                rows,
                row_len,
            }),
        }
    }
}

/// The item's lanes cut between whole rows, for an item tried row by row (and not empty).
fn whole_rows<L: Lanes>(lanes: L, rows: Option<Rows>) -> Option<WholeRows<L>> {
    let len = lanes.len();
    rows.filter(|_| len > 0).map(|rows| WholeRows {
        lanes,
        rows,
        row_len: len / rows.count,
    })
}

/// Elements of a Fortran-ordered row copied out per block for the contiguous kernels. A
/// block lives on the task's stack: measuring a row of any length allocates nothing, so
/// the write pass, which measures each row again, cannot fail on memory once it writes.
const ROW_BLOCK: usize = 256;

/// One block of a Fortran-ordered row, whose elements lie `count` apart.
struct Gathered<T, const N: usize> {
    start: [T; ROW_BLOCK],
    grad: [T; ROW_BLOCK],
    grad0: [T; ROW_BLOCK],
    slots: [[T; ROW_BLOCK]; N],
}

impl<T: Real, const N: usize> Gathered<T, N> {
    fn new() -> Self {
        let zero = T::from_f64(0.0);
        Gathered {
            start: [zero; ROW_BLOCK],
            grad: [zero; ROW_BLOCK],
            grad0: [zero; ROW_BLOCK],
            slots: [[zero; ROW_BLOCK]; N],
        }
    }

    /// Elements `from..from + len` (`len ≤ ROW_BLOCK`) of row `r` of `whole`, a whole
    /// array's reading whose rows are `count` in number.
    fn block(
        &mut self,
        whole: &Reading<'_, T, N>,
        (r, count): (usize, usize),
        from: usize,
        len: usize,
    ) -> Reading<'_, T, N> {
        let first = r + from * count;
        let gather = |into: &mut [T; ROW_BLOCK], values: &[T]| {
            let strided = values[first..].iter().step_by(count);
            for (to, &value) in into[..len].iter_mut().zip(strided) {
                *to = value;
            }
        };
        gather(&mut self.start, whole.start);
        gather(&mut self.grad, whole.grad);
        gather(&mut self.grad0, whole.grad0);
        for (into, values) in self.slots.iter_mut().zip(whole.slots) {
            gather(into, values);
        }
        Reading {
            start: &self.start[..len],
            grad: &self.grad[..len],
            grad0: &self.grad0[..len],
            slots: self.slots.each_ref().map(|s| &s[..len]),
            group: whole.group,
            item: whole.item,
        }
    }
}

/// Row `r` of a Fortran-ordered array (`whole`, its rows `count` in number) measured a
/// block at a time, the blocks' sums added in order (largest elements: their maximum) as
/// the pieces of a whole array are: the same figures in the read and the write pass,
/// whatever the thread count.
fn strided_row_measures<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    whole: &Reading<'_, T, N>,
    (r, count): (usize, usize),
    groups: &[GroupStep<U>],
    plan: GradientPlan,
) -> ArrayMeasures {
    let len = (whole.start.len() - r).div_ceil(count);
    let mut block = Gathered::new();
    let mut over_blocks = |how: Measure, combine: fn(f64, f64) -> f64| {
        let mut total: Option<[f64; 4]> = None;
        for from in (0..len).step_by(ROW_BLOCK) {
            let part = block.block(whole, (r, count), from, ROW_BLOCK.min(len - from));
            let part = measure_piece(part, groups, plan, how);
            total = Some(match total {
                None => part,
                Some(t) => std::array::from_fn(|k| combine(t[k], part[k])),
            });
        }
        total.unwrap_or_default()
    };
    let sums = over_blocks(Measure::Sums, |a, b| a + b);
    if !needs_rescue(&sums) {
        return from_sums(&sums, len);
    }
    let largest = over_blocks(Measure::Largest, f64::max);
    let exponents = exponents_of(&largest);
    let scaled = over_blocks(Measure::Scaled(exponents), |a, b| a + b);
    rescued(&largest, exponents, &scaled, len)
}

/// One row's measures from its elements alone, rescaled where needed.
fn row_measures<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    row: Reading<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
) -> ArrayMeasures {
    let len = row.len();
    let sums = measure_piece(row, groups, plan, Measure::Sums);
    if !needs_rescue(&sums) {
        return from_sums(&sums, len);
    }
    let largest = measure_piece(row, groups, plan, Measure::Largest);
    let exponents = exponents_of(&largest);
    let scaled = measure_piece(row, groups, plan, Measure::Scaled(exponents));
    rescued(&largest, exponents, &scaled, len)
}

/// Whether every row of a piece of whole rows is projected; stops at the first that is not.
fn rows_projected<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    piece: WholeRows<Reading<'_, T, N>>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
) -> bool {
    let WholeRows {
        lanes,
        rows,
        row_len,
    } = piece;
    let spec = &groups[lanes.group as usize].spec;
    match rows.fortran {
        false => (0..lanes.len() / row_len).all(|r| {
            let row = lanes.split_at(r * row_len).1.split_at(row_len).0;
            spec.projected(&row_measures(row, groups, plan)).is_some()
        }),
        true => (0..rows.count).all(|r| {
            let measures = strided_row_measures(&lanes, (r, rows.count), groups, plan);
            spec.projected(&measures).is_some()
        }),
    }
}

/// For each item (in the call's item order), whether its channel view projects it: every
/// row's cosine below its threshold.
fn channel_view<U, const N: usize>(
    items: &[LayerItem<'_, N>],
    count: usize,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
) -> Vec<bool>
where
    U: LayerUpdate<f32, N> + LayerUpdate<f64, N>,
{
    let mut projected = vec![false; count];
    let tried = items.iter().filter_map(|item| match item {
        ByDtype::Single(l) => whole_rows(ByDtype::Single(reading(l)), l.rows),
        ByDtype::Double(l) => whole_rows(ByDtype::Double(reading(l)), l.rows),
    });
    let tried: Vec<_> = tried.collect();
    for piece in &tried {
        match &piece.lanes {
            ByDtype::Single(l) => projected[l.item as usize] = true,
            ByDtype::Double(l) => projected[l.item as usize] = true,
        }
    }
    let verdicts = map_chunks(tried, |task| {
        task.map(|piece| match piece.typed() {
            ByDtype::Single(p) => (p.lanes.item as usize, rows_projected(p, groups, plan)),
            ByDtype::Double(p) => (p.lanes.item as usize, rows_projected(p, groups, plan)),
        })
        .collect::<Vec<_>>()
    });
    for (item, verdict) in verdicts.into_iter().flatten() {
        projected[item] &= verdict;
    }
    projected
}

/// One layer-wise step over every item (`count` of them, numbered by `item`), each with
/// its group's spec: the read pass, then the write pass with each array's factor.
/// Clipping and GSAM's mix are global, as for the element-wise optimizers.
pub fn layer_step<S: LayerSpec<N>, const N: usize>(
    items: Vec<LayerItem<'_, N>>,
    count: usize,
    groups: &[GroupStep<S>],
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<(), NormError> {
    // The read pass checks the gradients itself when no global norm is needed first.
    let unread = S::MEASURES
        .then(|| phases::plan_unread(clipping, gsam))
        .flatten();
    let plan = match unread {
        Some(plan) => plan,
        None => phases::plan_update(&items, clipping, gsam)?,
    };
    let measures = match S::MEASURES {
        true => array_measures(&items, count, groups, plan, unread.is_some())?,
        false => vec![ArrayMeasures::default(); count],
    };
    let factor = |group: u32, item: u32, adapt: bool| {
        let spec = &groups[group as usize].spec;
        <S as LayerUpdate<f64, N>>::factor(spec, &measures[item as usize], adapt)
    };
    let factors: Vec<f64> = items
        .iter()
        .map(|item| match item {
            ByDtype::Single(l) => factor(l.group, l.item, l.adapt),
            ByDtype::Double(l) => factor(l.group, l.item, l.adapt),
        })
        .collect();
    let mut by_item = vec![0.0; count];
    for (item, factor) in items.iter().zip(&factors) {
        let index = match item {
            ByDtype::Single(l) => l.item,
            ByDtype::Double(l) => l.item,
        };
        by_item[index as usize] = *factor;
    }
    let channels = match S::CHANNELS {
        true => channel_view(&items, count, groups, plan),
        false => vec![false; count],
    };
    let by_rows = |item: &LayerItem<'_, N>| match item {
        ByDtype::Single(l) => channels[l.item as usize],
        ByDtype::Double(l) => channels[l.item as usize],
    };
    let (rowwise, whole): (Vec<_>, Vec<_>) = items.into_iter().partition(by_rows);
    for_each(whole, |piece| match piece {
        ByDtype::Single(l) => {
            let factor = by_item[l.item as usize];
            update(l, groups, plan, factor)
        }
        ByDtype::Double(l) => {
            let factor = by_item[l.item as usize];
            update(l, groups, plan, factor)
        }
    });
    // Any cut between whole rows gives the same rows, so the even cut of element-wise
    // work does.
    let rowwise = rowwise.into_iter().filter_map(|item| match item {
        ByDtype::Single(l) => {
            let rows = l.rows;
            whole_rows(ByDtype::Single(l), rows)
        }
        ByDtype::Double(l) => {
            let rows = l.rows;
            whole_rows(ByDtype::Double(l), rows)
        }
    });
    for_each(rowwise.collect(), |piece| match piece.typed() {
        ByDtype::Single(p) => {
            let layer = by_item[p.lanes.item as usize];
            update_rows(p, groups, plan, layer)
        }
        ByDtype::Double(p) => {
            let layer = by_item[p.lanes.item as usize];
            update_rows(p, groups, plan, layer)
        }
    });
    Ok(())
}

/// The write pass over a piece of whole rows of an array its channel view projects: each
/// row measured again (the read pass's very sums, from the same values) just before it is
/// written with its own factor. `layer`, the array's factor, stands in for a row the read
/// pass found projected and this one would not (none: the sums are the same).
fn update_rows<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    piece: WholeRows<LayerLanes<'_, T, N>>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    layer: f64,
) {
    let WholeRows {
        lanes,
        rows,
        row_len,
    } = piece;
    let spec = &groups[lanes.group as usize].spec;
    match rows.fortran {
        false => {
            let mut rest = lanes;
            while !rest.is_empty() {
                let (row, tail) = rest.split_at(row_len);
                let measures = row_measures(reading(&row), groups, plan);
                let factor = spec.projected(&measures).unwrap_or(layer);
                update(row, groups, plan, factor);
                rest = tail;
            }
        }
        true => {
            let mut lanes = lanes;
            for r in 0..rows.count {
                let row = (r, rows.count);
                let measures = strided_row_measures(&reading(&lanes), row, groups, plan);
                let factor = spec.projected(&measures).unwrap_or(layer);
                update_strided(&mut lanes, r, rows.count, spec, plan, factor);
            }
        }
    }
}

/// The write pass over row `r` of a Fortran-ordered array, whose elements lie `count`
/// apart, with the row's factor.
fn update_strided<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    lanes: &mut LayerLanes<'_, T, N>,
    r: usize,
    count: usize,
    spec: &U,
    plan: GradientPlan,
    factor: f64,
) {
    let LayerLanes {
        param,
        grad,
        slots,
        start,
        grad0,
        ..
    } = lanes;
    let (grad, start) = (*grad, *start);
    let grad0 = grad0.unwrap_or(grad);
    for i in (r..param.len()).step_by(count) {
        let p0 = start.map_or(param[i], |s| s[i]);
        let g = match plan == GradientPlan::PLAIN {
            true => grad[i].to_f64(),
            false => gradient(plan, grad[i], grad0[i]),
        };
        param[i] = element_at(spec, p0, g, slots, i, factor);
    }
}

/// The write pass over one piece: every element with its array's factor.
fn update<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    lanes: LayerLanes<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    factor: f64,
) {
    widest!(update_body(lanes, groups, plan, factor))
}

kernel_body!(update_body[T: Real, U: LayerUpdate<T, N>, const N: usize](
    lanes: LayerLanes<'_, T, N>,
    groups: &[GroupStep<U>],
    plan: GradientPlan,
    factor: f64
) {
    let LayerLanes { param, grad, slots, start, grad0, group, .. } = lanes;
    let spec = &groups[group as usize].spec;
    let n = param.len();
    let grad = &grad[..n];
    let grad0 = grad0.map_or(grad, |s| &s[..n]);
    let slots = slots.map(|s| &mut s[..n]);
    match plan == GradientPlan::PLAIN {
        true => update_loop(param, slots, start, |i| grad[i].to_f64(), spec, factor),
        false => update_loop(
            param,
            slots,
            start,
            |i| gradient(plan, grad[i], grad0[i]),
            spec,
            factor,
        ),
    }
});

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn update_loop<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    param: &mut [T],
    slots: [&mut [T]; N],
    start: Option<&[T]>,
    gradient: impl Fn(usize) -> f64,
    spec: &U,
    factor: f64,
) {
    let n = param.len();
    let mut slots = slots.map(|s| &mut s[..n]);
    match start {
        Some(start) => {
            let start = &start[..n];
            for i in 0..n {
                param[i] = element_at(spec, start[i], gradient(i), &mut slots, i, factor);
            }
        }
        None => {
            for i in 0..n {
                param[i] = element_at(spec, param[i], gradient(i), &mut slots, i, factor);
            }
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn element_at<T: Real, U: LayerUpdate<T, N>, const N: usize>(
    spec: &U,
    p0: T,
    g: f64,
    slots: &mut [&mut [T]; N],
    i: usize,
    factor: f64,
) -> T {
    let mut state: [T; N] = std::array::from_fn(|k| slots[k][i]);
    let p = spec.element(p0, g, &mut state, factor);
    for k in 0..N {
        slots[k][i] = state[k];
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::GroupStep;

    const HYPER: LayerHyper = LayerHyper {
        base: Hyper {
            lr: 0.01,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
            nesterov: false,
            warmup_steps: 0,
            weight_sum: 0.0,
        },
        trust_coef: 0.001,
        sophia_rho: 0.04,
        refresh_hessian: false,
        adamp_delta: 0.1,
        adamp_wd_ratio: 0.5,
    };

    fn lanes<'a, const N: usize>(
        param: &'a mut [f64],
        grad: &'a [f64],
        slots: [&'a mut [f64]; N],
        start: Option<&'a [f64]>,
        item: u32,
    ) -> LayerItem<'a, N> {
        ByDtype::Double(LayerLanes {
            param,
            grad,
            slots,
            start,
            grad0: None,
            group: 0,
            item,
            adapt: true,
            rows: None,
        })
    }

    #[test]
    fn lars_scales_each_array_by_its_own_trust_ratio() {
        let spec = Lars::at_step(&HYPER, 1);
        let groups = [GroupStep { spec, l2: 0.0 }];
        let (mut a, ga, mut va) = ([3.0f64, 4.0], [0.0f64, 2.0], [0.0f64; 2]);
        let (mut b, gb, mut vb) = ([1.0f64], [-1.0f64], [0.5f64]);
        let items = vec![
            lanes(&mut a, &ga, [&mut va], None, 0),
            lanes(&mut b, &gb, [&mut vb], None, 1),
        ];
        layer_step(items, 2, &groups, Clipping::Off, None).unwrap();
        // Array 0: ‖p‖ = 5, ‖g‖ = 2: local lr = 0.01·0.001·5/(2 + 0.1·5).
        let local = 0.01 * 0.001 * 5.0 / (2.0 + 0.5);
        let v0 = [local * (0.0 + 0.1 * 3.0), local * (2.0 + 0.1 * 4.0)];
        assert_eq!(va, v0);
        assert_eq!(a, [3.0 - v0[0], 4.0 - v0[1]]);
        let local = 0.01 * 0.001 * 1.0 / (1.0 + 0.1);
        assert_eq!(vb, [0.9 * 0.5 + local * (-1.0 + 0.1)]);
    }

    #[test]
    fn the_read_pass_reads_the_start_values_not_the_parameter() {
        let spec = Lamb::at_step(&HYPER, 1);
        let groups = [GroupStep { spec, l2: 0.0 }];
        let g = [0.5f64, -0.25, 1.0];
        let start = [1.0f64, 2.0, -2.0];
        let mut restarted = [100.0f64, -7.0, 3.0];
        let (mut m1, mut v1) = ([0.0f64; 3], [0.0f64; 3]);
        let item = lanes(&mut restarted, &g, [&mut m1, &mut v1], Some(&start), 0);
        layer_step(vec![item], 1, &groups, Clipping::Off, None).unwrap();
        let mut plain = start;
        let (mut m2, mut v2) = ([0.0f64; 3], [0.0f64; 3]);
        let item = lanes(&mut plain, &g, [&mut m2, &mut v2], None, 0);
        layer_step(vec![item], 1, &groups, Clipping::Off, None).unwrap();
        assert_eq!(restarted, plain);
        assert_eq!((m1, v1), (m2, v2));
    }

    #[test]
    fn norms_survive_huge_and_tiny_arrays_and_thread_counts() {
        let spec = Lars::at_step(&HYPER, 1);
        let groups = [GroupStep { spec, l2: 0.0 }];
        let n = 3 * crate::parallel::CHUNK_LEN + 17;
        let p: Vec<f64> = (0..n).map(|i| 1e200 * (1.0 + (i % 7) as f64)).collect();
        let g: Vec<f64> = (0..n).map(|i| 1e-200 * (1.0 + (i % 5) as f64)).collect();
        let run = |threads: usize| {
            let (mut p, mut v) = (p.clone(), vec![0.0f64; n]);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let items = vec![lanes(&mut p, &g, [&mut v], None, 0)];
            let plan = GradientPlan::PLAIN;
            let measures = pool.install(|| array_measures(&items, 1, &groups, plan, false));
            measures.unwrap()[0].norms
        };
        let norms = run(1);
        let exact_p = p.iter().map(|x| (x / 1e200).powi(2)).sum::<f64>().sqrt() * 1e200;
        let exact_g = g.iter().map(|x| (x / 1e-200).powi(2)).sum::<f64>().sqrt() * 1e-200;
        assert!((norms[0] / exact_p - 1.0).abs() < 1e-12, "{norms:?}");
        assert!((norms[1] / exact_g - 1.0).abs() < 1e-12, "{norms:?}");
        for threads in [2, 3] {
            assert_eq!(run(threads).map(f64::to_bits), norms.map(f64::to_bits));
        }
    }

    #[test]
    fn adamp_removes_the_radial_part_of_a_weight_orthogonal_to_its_gradient() {
        let spec = AdamP::at_step(&HYPER, 1);
        let groups = [GroupStep { spec, l2: 0.0 }];
        // g ⟂ p: cosine 0 < δ/√2, so the weight is projected; the same values as a vector
        // (left out of the adaptation) are not.
        let (p0, g) = ([3.0f64, 4.0], [4.0f64, -3.0]);
        let run = |adapt: bool| {
            let (mut p, mut m, mut v) = (p0, [0.0f64; 2], [0.0f64; 2]);
            let item = ByDtype::Double(LayerLanes {
                param: &mut p,
                grad: &g,
                slots: [&mut m, &mut v],
                start: None,
                grad0: None,
                group: 0,
                item: 0,
                adapt,
                rows: None,
            });
            layer_step(vec![item], 1, &groups, Clipping::Off, None).unwrap();
            p
        };
        let step_size = 0.01 / (1.0 - 0.9);
        let u = g.map(|g| 0.1 * g / ((0.001 * g * g).sqrt() / 0.001f64.sqrt() + 1e-8));
        let unit = p0.map(|p| p / (5.0 + 1e-8));
        let along = unit[0] * u[0] + unit[1] * u[1];
        let decay = 0.01 * 0.1;
        let projected = run(true);
        let vector = run(false);
        for i in 0..2 {
            let expected = p0[i] * (1.0 - decay * 0.5) - step_size * (u[i] - unit[i] * along);
            assert!((projected[i] - expected).abs() < 1e-15, "{projected:?}");
            let expected = p0[i] * (1.0 - decay) - step_size * u[i];
            assert!((vector[i] - expected).abs() < 1e-15, "{vector:?}");
        }
        let radial = |p: [f64; 2]| (p[0] - p0[0]) * p0[0] + (p[1] - p0[1]) * p0[1];
        assert!((radial(projected) + decay * 0.5 * 25.0).abs() < 1e-8);
        assert!((radial(vector) + decay * 25.0).abs() > 1e-3);
    }

    /// One AdamP step (Nesterov off) of a 3×2 weight, given by rows, in C or Fortran
    /// order, tried row by row; the new rows.
    fn adamp_rows(p: [[f64; 2]; 3], g: [[f64; 2]; 3], fortran: bool) -> [[f64; 2]; 3] {
        let spec = AdamP::at_step(&HYPER, 1);
        let groups = [GroupStep { spec, l2: 0.0 }];
        let flat = |x: [[f64; 2]; 3]| -> Vec<f64> {
            match fortran {
                false => x.iter().flatten().copied().collect(),
                true => (0..6).map(|i| x[i % 3][i / 3]).collect(),
            }
        };
        let (mut param, grad) = (flat(p), flat(g));
        let (mut m, mut v) = (vec![0.0f64; 6], vec![0.0f64; 6]);
        let item = ByDtype::Double(LayerLanes {
            param: &mut param,
            grad: &grad,
            slots: [&mut m, &mut v],
            start: None,
            grad0: None,
            group: 0,
            item: 0,
            adapt: true,
            rows: Some(Rows { count: 3, fortran }),
        });
        layer_step(vec![item], 1, &groups, Clipping::Off, None).unwrap();
        std::array::from_fn(|r| {
            std::array::from_fn(|j| match fortran {
                false => param[2 * r + j],
                true => param[r + 3 * j],
            })
        })
    }

    #[test]
    fn adamp_projects_each_row_when_every_row_is_orthogonal_to_its_gradient() {
        // Each row's cosine is 0 < δ/√2: every row loses its own radial part.
        let p = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]];
        let g = [[4.0, -3.0], [0.0, 2.0], [5.0, 0.0]];
        let step_size = 0.01 / (1.0 - 0.9);
        let direction = |g: f64| 0.1 * g / ((0.001 * g * g).sqrt() / 0.001f64.sqrt() + 1e-8);
        let decay = 0.01 * 0.1;
        let by_rows = adamp_rows(p, g, false);
        for r in 0..3 {
            let u = g[r].map(direction);
            let norm = (p[r][0] * p[r][0] + p[r][1] * p[r][1]).sqrt();
            let unit = p[r].map(|x| x / (norm + 1e-8));
            let along = unit[0] * u[0] + unit[1] * u[1];
            for j in 0..2 {
                let expected = p[r][j] * (1.0 - decay * 0.5) - step_size * (u[j] - unit[j] * along);
                let found = by_rows[r][j];
                assert!((found - expected).abs() < 1e-15, "{by_rows:?}");
            }
        }
        // Fortran order: the same rows, element for element the same arithmetic.
        let fortran = adamp_rows(p, g, true);
        assert_eq!(
            fortran.map(|r| r.map(f64::to_bits)),
            by_rows.map(|r| r.map(f64::to_bits))
        );
    }

    #[test]
    fn adamp_measures_long_fortran_rows_by_blocks_as_the_same_rows_in_c_order() {
        // 3 rows of 700 elements: each Fortran row spans three blocks. Every row is
        // orthogonal to its gradient, so each is projected (a row the blocks mismeasured
        // would fall back or take another coefficient).
        let (rows, len) = (3, 700);
        let p: Vec<f64> = (0..rows * len)
            .map(|i| 1.0 + ((i * 7) % 13) as f64 / 13.0)
            .collect();
        let mut g: Vec<f64> = (0..rows * len)
            .map(|i| ((i * 5) % 11) as f64 - 5.0)
            .collect();
        for r in 0..rows {
            let row = r * len..(r + 1) * len;
            let along: f64 = row.clone().map(|i| p[i] * g[i]).sum::<f64>()
                / row.clone().map(|i| p[i] * p[i]).sum::<f64>();
            row.for_each(|i| g[i] -= along * p[i]);
        }
        let step = |fortran: bool| -> Vec<f64> {
            let spec = AdamP::at_step(&HYPER, 1);
            let groups = [GroupStep { spec, l2: 0.0 }];
            // C order is row-major; Fortran order holds element (r, j) at r + rows·j.
            let at = |i: usize| match fortran {
                false => i,
                true => (i % rows) * len + i / rows,
            };
            let mut param: Vec<f64> = (0..rows * len).map(|i| p[at(i)]).collect();
            let grad: Vec<f64> = (0..rows * len).map(|i| g[at(i)]).collect();
            let (mut m, mut v) = (vec![0.0; rows * len], vec![0.0; rows * len]);
            let item = ByDtype::Double(LayerLanes {
                param: &mut param,
                grad: &grad,
                slots: [&mut m, &mut v],
                start: None,
                grad0: None,
                group: 0,
                item: 0,
                adapt: true,
                rows: Some(Rows {
                    count: rows,
                    fortran,
                }),
            });
            layer_step(vec![item], 1, &groups, Clipping::Off, None).unwrap();
            let mut by_rows = vec![0.0; rows * len];
            for (i, value) in param.into_iter().enumerate() {
                by_rows[at(i)] = value;
            }
            by_rows
        };
        let (c_order, fortran) = (step(false), step(true));
        for i in 0..rows * len {
            assert!(
                (fortran[i] - c_order[i]).abs() <= 1e-14 * c_order[i].abs(),
                "{i}"
            );
        }
        // Each row projected on its own: a row moves along itself by the halved decay
        // alone (wd_ratio 0.5), which the layer view would not give row by row.
        for r in 0..rows {
            let row = r * len..(r + 1) * len;
            let radial: f64 = row.clone().map(|i| (fortran[i] - p[i]) * p[i]).sum();
            let half_decay = -0.01 * 0.1 * 0.5 * row.map(|i| p[i] * p[i]).sum::<f64>();
            assert!(
                (radial - half_decay).abs() < 1e-9 * half_decay.abs(),
                "row {r}"
            );
        }
    }

    #[test]
    fn adamp_falls_back_to_the_layer_view_when_a_row_is_not_orthogonal() {
        // Rows 0 and 1 have cosine 1, the whole array 0: projected as a whole, by its own
        // unit vector, along which the update has no part here.
        let p = [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]];
        let g = [[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0]];
        let step_size = 0.01 / (1.0 - 0.9);
        let direction = |g: f64| 0.1 * g / ((0.001 * g * g).sqrt() / 0.001f64.sqrt() + 1e-8);
        let decay = 0.01 * 0.1;
        for fortran in [false, true] {
            let found = adamp_rows(p, g, fortran);
            for r in 0..3 {
                for j in 0..2 {
                    let expected = p[r][j] * (1.0 - decay * 0.5) - step_size * direction(g[r][j]);
                    assert!((found[r][j] - expected).abs() < 1e-15, "{found:?}");
                }
            }
        }
    }

    #[test]
    fn sophia_clips_the_preconditioned_moment_and_refreshes_h_when_told() {
        let refreshing = LayerHyper {
            refresh_hessian: true,
            ..HYPER
        };
        let spec = Sophia::at_step(&refreshing, 1);
        let mut s = [0.0f64, 0.5];
        let p = spec.element(2.0, 3.0, &mut s, 1.0);
        let (m, h) = ((1.0 - 0.9) * 3.0, 0.999 * 0.5 + (1.0 - 0.999) * 9.0);
        assert_eq!(s, [m, h]);
        let ratio = (m / (0.04 * h)).clamp(-1.0, 1.0);
        assert_eq!(ratio, 1.0);
        assert_eq!(p, 2.0 - 0.01 * 0.1 * 2.0 - 0.01 * ratio);
        let quiet = Sophia::at_step(&HYPER, 2);
        let mut s = [1e-9f64, 0.0];
        let p = quiet.element(1.0, 0.0, &mut s, 1.0);
        assert_eq!(s[1], 0.0);
        let m = 0.9 * 1e-9 + (1.0 - 0.9) * 0.0;
        assert_eq!(p, 1.0 - 0.01 * 0.1 * 1.0 - 0.01 * (m / 1e-8));
    }

    #[test]
    fn sophia_hessian_blends_per_group_and_refuses_non_finite_estimates() {
        let (mut h0, mut h1) = ([1.0f64, 2.0], [4.0f32]);
        let (e0, e1) = ([3.0f64, 0.0], [f32::NAN]);
        let items = vec![
            ByDtype::Double((&mut h0[..], &e0[..], 0)),
            ByDtype::Single((&mut h1[..], &e1[..], 1)),
        ];
        assert_eq!(
            sophia_hessian(items, &[0.5, 0.9]),
            Err(NormError::NonFiniteGradient(1))
        );
        assert_eq!((h0, h1), ([1.0, 2.0], [4.0]));
        let items = vec![ByDtype::Double((&mut h0[..], &e0[..], 0))];
        sophia_hessian(items, &[0.5, 0.9]).unwrap();
        assert_eq!(h0, [2.0, 1.0]);
    }
}
