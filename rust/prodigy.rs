//! Prodigy (Mishchenko & Defazio, 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
//! Learner", Algorithm 3, Adam form), as the authors' code (konstmish/prodigy) runs it.
//!
//! The step size `d` is a global estimate made of two reductions over every element, the
//! numerator `r ← β3·r + (d/d0)·d·γ·⟨g, x0 − x⟩` and `‖s‖₁`. One pass over the elements
//! steps with the current `d_k` and, as it goes, sums what gives `d_{k+1}`: the algorithm's
//! own order (its step `k` uses `d_k`; `d_{k+1}` comes from the moments of step `k`), so no
//! read pass is needed. The sums are reproducible: pieces of `CHUNK_LEN` elements, summed
//! in a fixed order within a piece and in piece order across them, whatever the threads.
//!
//! Each parameter keeps `exp_avg`, `exp_avg_sq`, `s` and `x0 − x`, its displacement from
//! where the optimizer first saw it: zero at first (the slot needs no copy of the
//! parameter), then the sum of the steps as computed. Arithmetic is at the parameter's
//! precision, as for the other dividing optimizers; the sums are f64.

use crate::float::Real;
use crate::kernels::{GradientPlan, UpdateLanes};
use crate::norm::NormError;
use crate::parallel::{map_chunks, ByDtype};
use crate::phases::{self, Clipping, GsamInputs, UpdateItem};

/// The state-dict key prefix of each slot (the authors' names; the crate keeps none).
pub const SLOTS: [&str; 4] = ["exp_avg.", "exp_avg_sq.", "s.", "p0_minus_p."];

/// The hyperparameters every parameter shares (the crate's `ProdigyConfig`, with the
/// authors' `beta3`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigyHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    pub epsilon: f64,
    pub d0: f64,
    pub d_coef: f64,
    /// `d_{k+1} ≤ (1 + d_growth_rate)·d_k` (infinite: no limit).
    pub d_growth_rate: f64,
    pub bias_correction: bool,
}

/// What a parameter group may set for itself: its `γ` (lr) and its decoupled decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigyGroup {
    pub lr: f64,
    pub weight_decay: f64,
}

/// The global estimate: `d`, the largest estimate so far and the running numerator `r`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub d: f64,
    pub d_max: f64,
    pub numerator: f64,
}

impl Estimate {
    pub fn initial(hyper: &ProdigyHyper) -> Estimate {
        Estimate {
            d: hyper.d0,
            d_max: hyper.d0,
            numerator: 0.0,
        }
    }

    /// `d_{k+1}` from this step's sums `[Σ (d/d0)·dlr·⟨g, x0 − x⟩, ‖s‖₁]`, as the authors'
    /// code: `d̂ = d_coef·r/‖s‖₁ ; d_max ← max(d_max, d̂) ; d ← min(d_max, growth·d)` (the
    /// first estimate taken whole). With `‖s‖₁ = 0` (no gradient yet) nothing changes.
    pub fn next(self, hyper: &ProdigyHyper, [numerator, denominator]: [f64; 2]) -> Estimate {
        if denominator == 0.0 {
            return self;
        }
        let numerator = hyper.beta3 * self.numerator + numerator;
        let d_hat = hyper.d_coef * numerator / denominator;
        let mut d = self.d;
        if d == hyper.d0 {
            d = d.max(d_hat);
        }
        let d_max = self.d_max.max(d_hat);
        Estimate {
            d: d_max.min(d * (1.0 + hyper.d_growth_rate)),
            d_max,
            numerator,
        }
    }
}

/// One group's scalars for step `t` with the estimate `d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    beta1: f64,
    beta2: f64,
    beta3: f64,
    /// `(1−β1)·d` and `(1−β2)·d²`: the moments carry `d` as in the algorithm.
    moment1: f64,
    moment2: f64,
    /// `(d/d0)·dlr`, the weight of `g` in `s` and in the numerator.
    weight: f64,
    /// `dlr = d·lr·bias correction`.
    dlr: f64,
    /// `dlr·weight_decay`.
    decay: f64,
    /// `d·ε`.
    epsilon: f64,
    /// `lr = 0`: the group is left alone and out of the estimate (the authors' code).
    frozen: bool,
}

impl Step {
    pub fn at(hyper: &ProdigyHyper, group: &ProdigyGroup, estimate: &Estimate, t: u64) -> Step {
        let d = estimate.d;
        let correction = match hyper.bias_correction {
            // `powf` is the C library's `pow`, as Python's `**` on floats.
            true => (1.0 - hyper.beta2.powf(t as f64)).sqrt() / (1.0 - hyper.beta1.powf(t as f64)),
            false => 1.0,
        };
        let dlr = d * group.lr * correction;
        Step {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            beta3: hyper.beta3,
            moment1: (1.0 - hyper.beta1) * d,
            moment2: (1.0 - hyper.beta2) * d * d,
            weight: d / hyper.d0 * dlr,
            dlr,
            decay: dlr * group.weight_decay,
            epsilon: d * hyper.epsilon,
            frozen: group.lr == 0.0,
        }
    }
}

/// One element at the parameter's precision: its new value from its start value `p0` and
/// gradient `g`, updating `[exp_avg, exp_avg_sq, s, x0 − x]`; returns it with
/// `⟨g, x0 − x⟩`'s term and `|s|`, in f64 for the sums. `x0 − x` grows by the step as
/// computed, not by the difference of rounded values: a float32 parameter whose steps are
/// below its rounding still records how far it was asked to go.
pub trait Precision: Real {
    fn element(step: &Step, p0: Self, g: f64, lanes: [&mut Self; 4]) -> (Self, f64, f64);
}

impl Precision for f64 {
    #[inline(always)]
    fn element(step: &Step, p0: f64, g: f64, [m, v, s, delta]: [&mut f64; 4]) -> (f64, f64, f64) {
        let moment = step.beta1 * *m + step.moment1 * g;
        let second = step.beta2 * *v + step.moment2 * (g * g);
        let sum = step.beta3 * *s + step.weight * g;
        let update = step.decay * p0 + step.dlr * moment / (second.sqrt() + step.epsilon);
        let product = g * *delta;
        (*m, *v, *s, *delta) = (moment, second, sum, *delta + update);
        (p0 - update, product, sum.abs())
    }
}

impl Precision for f32 {
    /// Computed in f32, as Adam's float32 update: in f64 the square root and the division
    /// made the kernel compute-bound on float32 data (1.9 of its floor at 10M).
    #[inline(always)]
    fn element(step: &Step, p0: f32, g: f64, [m, v, s, delta]: [&mut f32; 4]) -> (f32, f64, f64) {
        let g32 = g as f32;
        let moment = step.beta1 as f32 * *m + step.moment1 as f32 * g32;
        let second = step.beta2 as f32 * *v + step.moment2 as f32 * (g32 * g32);
        let sum = step.beta3 as f32 * *s + step.weight as f32 * g32;
        let denom = second.sqrt() + step.epsilon as f32;
        let update = step.decay as f32 * p0 + step.dlr as f32 * moment / denom;
        let product = g * f64::from(*delta);
        (*m, *v, *s, *delta) = (moment, second, sum, *delta + update);
        (p0 - update, product, f64::from(sum.abs()))
    }
}

/// One piece: every element stepped with its group's scalars; returns the piece's
/// `[Σ (d/d0)·dlr·g·(x0 − x), Σ |s|]`, each summed into four running sums by `i % 4` (a
/// fixed grouping, so a fixed result, in blocks that vectorise).
fn step_piece<T: Precision>(
    lanes: UpdateLanes<'_, T, 4>,
    groups: &[Step],
    plan: GradientPlan,
) -> [f64; 2] {
    widest!(piece_body(lanes, groups, plan))
}

kernel_body!(piece_body[T: Precision](
    lanes: UpdateLanes<'_, T, 4>,
    groups: &[Step],
    plan: GradientPlan
) -> [f64; 2] {
    let UpdateLanes { param, grad, slots, start, grad0, group } = lanes;
    let step = &groups[group as usize];
    let n = param.len();
    if step.frozen {
        if let Some(start) = start {
            param.copy_from_slice(&start[..n]);
        }
        return [0.0; 2];
    }
    let grad = &grad[..n];
    let grad0 = grad0.map_or(grad, |g0| &g0[..n]);
    let [m, v, s, delta] = slots.map(|slot| &mut slot[..n]);
    let mut acc = [[0.0f64; 4]; 2];
    // Each block is updated in a loop that vectorises, its terms kept; then they are added
    // into the running sums of their lane (`i % 4`: blocks are multiples of four long).
    let mut terms = [[0.0f64; BLOCK]; 2];
    let mut begin = 0;
    while begin < n {
        let end = n.min(begin + BLOCK);
        let block = Block {
            param: &mut param[begin..end],
            grad: &grad[begin..end],
            grad0: &grad0[begin..end],
            slots: [&mut m[begin..end], &mut v[begin..end], &mut s[begin..end], &mut delta[begin..end]],
            start: start.map(|start| &start[begin..end]),
        };
        let len = end - begin;
        block_update(block, step, plan, &mut terms);
        let whole = len - len % 4;
        for k in 0..2 {
            for quad in (0..whole).step_by(4) {
                for lane in 0..4 {
                    acc[k][lane] += terms[k][quad + lane];
                }
            }
            for j in whole..len {
                acc[k][j % 4] += terms[k][j];
            }
        }
        begin = end;
    }
    let [products, sizes] = acc.map(|sums| (sums[0] + sums[1]) + (sums[2] + sums[3]));
    [step.weight * products, sizes]
});

/// Elements per block of a piece (a multiple of four).
const BLOCK: usize = 256;

/// One block's streams, all of one length.
struct Block<'a, T> {
    param: &'a mut [T],
    grad: &'a [T],
    grad0: &'a [T],
    slots: [&'a mut [T]; 4],
    start: Option<&'a [T]>,
}

/// Updates one block, writing each element's `g·(x0 − x)` and `|s|` into `terms`.
#[inline(always)]
fn block_update<T: Precision>(
    block: Block<'_, T>,
    step: &Step,
    plan: GradientPlan,
    terms: &mut [[f64; BLOCK]; 2],
) {
    let Block {
        param,
        grad,
        grad0,
        slots,
        start,
    } = block;
    let n = param.len();
    let (grad, grad0) = (&grad[..n], &grad0[..n]);
    // Without clipping or a mix the gradient is `g` itself: skip those operations.
    match plan == GradientPlan::PLAIN {
        true => block_loop(param, slots, start, |i| grad[i].to_f64(), step, terms),
        false => {
            let g = |i: usize| plan.gradient(grad[i], grad0[i]);
            block_loop(param, slots, start, g, step, terms)
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn block_loop<T: Precision>(
    param: &mut [T],
    [m, v, s, delta]: [&mut [T]; 4],
    start: Option<&[T]>,
    gradient: impl Fn(usize) -> f64,
    step: &Step,
    terms: &mut [[f64; BLOCK]; 2],
) {
    let n = param.len().min(BLOCK);
    let (m, v, s, delta) = (&mut m[..n], &mut v[..n], &mut s[..n], &mut delta[..n]);
    let [products, sizes] = terms;
    let (products, sizes) = (&mut products[..n], &mut sizes[..n]);
    let param = &mut param[..n];
    match start {
        Some(start) => {
            let start = &start[..n];
            for i in 0..n {
                let lanes = [&mut m[i], &mut v[i], &mut s[i], &mut delta[i]];
                (param[i], products[i], sizes[i]) = T::element(step, start[i], gradient(i), lanes);
            }
        }
        None => {
            for i in 0..n {
                let lanes = [&mut m[i], &mut v[i], &mut s[i], &mut delta[i]];
                (param[i], products[i], sizes[i]) = T::element(step, param[i], gradient(i), lanes);
            }
        }
    }
}

/// One Prodigy step over every item, each with its group's scalars; returns the step's
/// `[numerator term, ‖s‖₁]` for `Estimate::next`. Clipping and GSAM's mix are global, as
/// for the other optimizers.
pub fn prodigy_step(
    items: Vec<UpdateItem<'_, 4>>,
    groups: &[Step],
    clipping: Clipping,
    gsam: Option<GsamInputs>,
) -> Result<[f64; 2], NormError> {
    let plan = phases::plan_update(&items, clipping, gsam)?;
    let add = |a: [f64; 2], b: [f64; 2]| [a[0] + b[0], a[1] + b[1]];
    let partials = map_chunks(items, |task| {
        task.map(|piece| match piece {
            ByDtype::Single(lanes) => step_piece(lanes, groups, plan),
            ByDtype::Double(lanes) => step_piece(lanes, groups, plan),
        })
        .fold([0.0; 2], add)
    });
    Ok(partials.into_iter().fold([0.0; 2], add))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER: ProdigyHyper = ProdigyHyper {
        beta1: 0.9,
        beta2: 0.999,
        beta3: 0.5,
        epsilon: 1e-8,
        d0: 1e-3,
        d_coef: 1.0,
        d_growth_rate: f64::INFINITY,
        bias_correction: false,
    };
    const GROUP: ProdigyGroup = ProdigyGroup {
        lr: 1.0,
        weight_decay: 0.0,
    };

    fn item<'a>(
        param: &'a mut [f64],
        grad: &'a [f64],
        slots: [&'a mut [f64]; 4],
        start: Option<&'a [f64]>,
    ) -> UpdateItem<'a, 4> {
        ByDtype::Double(UpdateLanes {
            param,
            grad,
            slots,
            start,
            grad0: None,
            group: 0,
        })
    }

    #[test]
    fn one_step_matches_the_algorithm_and_sums_for_the_next_d() {
        let estimate = Estimate::initial(&HYPER);
        let step = Step::at(&HYPER, &GROUP, &estimate, 1);
        let (mut p, g) = ([1.0f64, -2.0], [0.5f64, 0.25]);
        let (mut m, mut v, mut s) = ([0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
        let mut delta = [0.1f64, -0.2];
        let slots = [&mut m[..], &mut v[..], &mut s[..], &mut delta[..]];
        let sums = prodigy_step(
            vec![item(&mut p, &g, slots, None)],
            &[step],
            Clipping::Off,
            None,
        )
        .unwrap();
        let d = 1e-3;
        for i in 0..2 {
            let (m1, v1) = (0.9 * 0.0 + (1.0 - 0.9) * d * g[i], {
                let c2 = (1.0 - 0.999) * d * d;
                0.999 * 0.0 + c2 * (g[i] * g[i])
            });
            assert_eq!((m[i], v[i]), (m1, v1));
            assert_eq!(s[i], d / d * d * g[i]);
        }
        let expected = 1.0 - d * m[0] / (v[0].sqrt() + d * 1e-8);
        assert!((p[0] - expected).abs() <= 1e-15, "{} {expected}", p[0]);
        assert_eq!(delta[0], 0.1 + d * m[0] / (v[0].sqrt() + d * 1e-8));
        let numerator = d * (0.5 * 0.1 + 0.25 * -0.2);
        assert!((sums[0] - numerator).abs() <= 1e-18, "{sums:?}");
        assert_eq!(sums[1], s[0].abs() + s[1].abs());
    }

    #[test]
    fn d_takes_the_first_estimate_whole_then_grows_at_most_by_the_rate() {
        let limited = ProdigyHyper {
            d_growth_rate: 0.5,
            ..HYPER
        };
        let first = Estimate::initial(&limited).next(&limited, [4e-3, 1.0]);
        // d = d0 takes max(d0, d̂) = 4e-3, then min(d_max, 1.5·4e-3).
        assert_eq!((first.d, first.d_max, first.numerator), (4e-3, 4e-3, 4e-3));
        let second = first.next(&limited, [1.0, 1.0]);
        assert_eq!(second.d, 1.5 * 4e-3);
        assert_eq!(second.d_max, 0.5 * 4e-3 + 1.0);
        // A negative estimate leaves d_max, and d climbs on towards it at the rate.
        let negative = second.next(&limited, [-10.0, 1.0]);
        assert_eq!((negative.d, negative.d_max), (1.5 * second.d, second.d_max));
        assert_eq!(negative.next(&limited, [5.0, 0.0]), negative);
    }

    #[test]
    fn frozen_groups_restore_and_stay_out_of_the_estimate() {
        let frozen = ProdigyGroup {
            lr: 0.0,
            weight_decay: 0.1,
        };
        let step = Step::at(&HYPER, &frozen, &Estimate::initial(&HYPER), 1);
        let (mut p, g, saved) = ([5.0f64], [1.0f64], [2.0f64]);
        let (mut m, mut v, mut s, mut delta) = ([0.0f64], [0.0f64], [0.0f64], [0.0f64]);
        let slots = [&mut m[..], &mut v[..], &mut s[..], &mut delta[..]];
        let items = vec![item(&mut p, &g, slots, Some(&saved))];
        let sums = prodigy_step(items, &[step], Clipping::Off, None).unwrap();
        assert_eq!((p, m, s, sums), ([2.0], [0.0], [0.0], [0.0, 0.0]));
    }

    #[test]
    fn float32_computes_what_float64_does_at_its_precision() {
        let estimate = Estimate {
            d: 0.02,
            d_max: 0.03,
            numerator: 1.0,
        };
        let step = Step::at(&HYPER, &GROUP, &estimate, 7);
        let state = [0.01f64, 0.002, -0.3, 0.05];
        let [mut m, mut v, mut s, mut delta] = state;
        let wide = f64::element(&step, 1.5, -0.7, [&mut m, &mut v, &mut s, &mut delta]);
        let [mut m32, mut v32, mut s32, mut delta32] = state.map(|x| x as f32);
        let lanes = [&mut m32, &mut v32, &mut s32, &mut delta32];
        let narrow = f32::element(&step, 1.5, -0.7, lanes);
        let near = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
        assert!(near(f64::from(narrow.0), wide.0) && near(narrow.2, wide.2));
        assert_eq!(narrow.1, -0.7 * f64::from(0.05f32));
        for (a, b) in [(m32, m), (v32, v), (s32, s), (delta32, delta)] {
            assert!(near(f64::from(a), b), "{a} {b}");
        }
    }

    #[test]
    fn sums_do_not_depend_on_the_thread_count() {
        let n = 3 * crate::parallel::CHUNK_LEN + 17;
        let g: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let start: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut p = start.clone();
            let mut slots: [Vec<f64>; 4] = std::array::from_fn(|k| vec![0.01 * k as f64; n]);
            let [m, v, s, delta] = slots.each_mut().map(|x| x.as_mut_slice());
            let estimate = Estimate::initial(&HYPER);
            let step = Step::at(&HYPER, &GROUP, &estimate, 3);
            let items = vec![item(&mut p, &g, [m, v, s, delta], None)];
            let sums = pool.install(|| prodigy_step(items, &[step], Clipping::Off, None).unwrap());
            (sums.map(f64::to_bits), p)
        };
        let one = run(1);
        for threads in [2, 3] {
            assert_eq!(run(threads), one);
        }
    }
}
