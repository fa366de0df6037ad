//! The Python entry points: one function per optimizer phase, each one validated, claimed
//! call over every array of the dict (`driver`) that commits its state changes into the
//! optimizers' native state (`engine`) before it returns. `sam_step` runs a whole SAM
//! step, the user's gradient function included, inside one call.

use numpy::{Element, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::sync::Arc;

use super::arrays::{
    self, norm_gradient, norm_source, sorted_entries, Float, Key, NameOrder, NormSource,
};
use super::driver::{prepare, Entry, EntryCache, Groups, Pending, Policy, Prepared, TableRef, Use};
use super::engine::{busy, Engine, SamEngine, StagedSamState, SAM_SLOTS};
use super::layerwise::{self, LayerEngine};
use super::prodigy::{self, ProdigyEngine};
use super::{optimizer_error, OptimizerError};
use crate::claims::{self, CallClaims, Registration};
use crate::kernels::{
    CopyLanes, GroupStep, MixLanes, PerturbLanes, RestoreKeepingLanes, UpdateLanes,
};
use crate::norm::{NormError, NormItem};
use crate::parallel::ByDtype;
use crate::phases::{self, GsamInputs};
use crate::specs::{
    AdaBelief, AdaMax, Adagrad, Adam, Hyper, Kind, Lion, NAdam, RAdam, RmsProp, ScheduleFreeAdamW,
    Sgd, Spec,
};
use crate::state::{self, Table};

pub(super) fn borrow<'py, T>(object: &Bound<'py, T>) -> PyResult<PyRefMut<'py, T>>
where
    T: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::False>,
{
    object.try_borrow_mut().map_err(|_| busy())
}

/// Misuse of the two-phase protocol: an error that names no key.
fn protocol_error(message: &str) -> PyErr {
    OptimizerError::new_err((message.to_owned(), Option::<String>::None))
}

/// For phases whose arithmetic does not depend on the parameters' groups.
const UNGROUPED: Groups<'static, 'static> = Groups {
    assign: None,
    count: 1,
};

/// SAM's saved values and, for GSAM, the gradients at the original point, in table
/// `table` of the call.
pub(super) fn sam_uses(table: usize, gsam: bool, policy: Policy) -> Vec<Use> {
    let mut uses = vec![Use {
        table,
        slot: 0,
        prefix: SAM_SLOTS[0],
        policy,
    }];
    if gsam {
        uses.push(Use {
            table,
            slot: 1,
            prefix: SAM_SLOTS[1],
            policy,
        });
    }
    uses
}

/// A base step's lanes for one entry: the `N` slots, then SAM's saved values and GSAM's
/// g0 when the step restarts from them.
fn update_lanes<'a, T: Float, const N: usize>(
    entry: &'a mut Entry<'_, T>,
    restart: bool,
    mix: bool,
) -> UpdateLanes<'a, T, N> {
    let group = entry.group;
    let (param, grad, states) = entry.lanes();
    let mut states = states.into_iter();
    let slots: [&mut [T]; N] = std::array::from_fn(|_| states.next().expect("one per slot"));
    let start = restart.then(|| &*states.next().expect("saved values"));
    let grad0 = mix.then(|| &*states.next().expect("GSAM's g0"));
    UpdateLanes {
        param,
        grad: grad.expect("a base step has gradients"),
        slots,
        start,
        grad0,
        group,
    }
}

/// SAM's part in a base step: restarting from its saved values (with GSAM's mix when
/// `alpha` is set), counting one more `sam_step` call, or both.
pub(super) struct SamPart<'a> {
    pub sam: &'a mut SamEngine,
    pub restart: bool,
    pub alpha: Option<f64>,
    pub count: bool,
}

/// A base optimizer's own table, name order and entry cache.
pub(super) struct BaseTable<'a> {
    pub table: &'a mut Table,
    pub order: &'a mut NameOrder,
    pub cache: &'a mut EntryCache,
}

/// A base step's call, validated and claimed: its own slots (and, restarting SAM's first
/// step, the saved values and GSAM's g0 from SAM's table), and what it owes SAM's state.
/// It ends in `fail` or `commit`.
pub(super) struct BaseCall<'a, 'py> {
    pub prepared: Prepared<'py>,
    /// Whether the lanes carry SAM's saved values (and `gsam`'s g0) after the slots.
    pub restart: bool,
    pub gsam: Option<GsamInputs>,
    tables: Vec<TableRef<'a>>,
    /// The pending first_step's claims, given back should the call fail.
    restarting_claims: Option<&'a mut Option<Registration>>,
    /// SAM's pending set and call count, with whether this call counts one.
    count: Option<(&'a mut Option<Vec<usize>>, &'a mut u64, bool)>,
}

/// Prepares a base step over `slots` of the base's table, or, with `sam`, SAM's second
/// step restarting from its saved values: the one place that decides which tables, uses
/// and pending claims such a call has, for every kind of base engine.
pub(super) fn prepare_base_call<'a, 'py>(
    base: BaseTable<'a>,
    slots: &[&'static str],
    sam: Option<SamPart<'a>>,
    groups: &Groups<'_, 'py>,
    params: &Bound<'py, PyDict>,
    grads: &Bound<'py, PyDict>,
) -> PyResult<BaseCall<'a, 'py>> {
    let BaseTable {
        table,
        order,
        cache,
    } = base;
    let mut uses: Vec<Use> = (0..slots.len())
        .map(|slot| Use {
            table: 0,
            slot,
            prefix: slots[slot],
            policy: Policy::Lazy,
        })
        .collect();
    let mut tables = vec![TableRef { table, cache }];
    let (mut order, mut restart, mut gsam, mut count) = (order, false, None, None);
    // The pending first_step to restart from: its entries and the claims it holds.
    let mut restarting = None;
    if let Some(SamPart {
        sam,
        restart: restarts,
        alpha,
        count: counts,
    }) = sam
    {
        let SamEngine {
            state,
            order: sam_order,
            cache: sam_cache,
            ..
        } = sam;
        if restarts {
            uses.extend(sam_uses(1, alpha.is_some(), Policy::Required));
            gsam = alpha.map(|alpha| GsamInputs {
                alpha,
                grad0_norm: state.grad0_norm,
            });
            tables.push(TableRef {
                table: &mut state.table,
                cache: sam_cache,
            });
            order = sam_order;
            restart = true;
            restarting = state
                .pending
                .clone()
                .map(|entries| (entries, &mut state.pending_claims));
        }
        count = Some((&mut state.pending, &mut state.calls, counts));
    }
    let pending = restarting.as_mut().map(|(entries, claims)| Pending {
        table: 1,
        entries,
        claims,
    });
    let prepared = prepare(
        params,
        Some(order),
        Some(grads),
        &mut tables,
        &uses,
        pending,
        groups,
    )?;
    Ok(BaseCall {
        prepared,
        restart,
        gsam,
        tables,
        restarting_claims: restarting.map(|(_, claims)| claims),
        count,
    })
}

impl BaseCall<'_, '_> {
    /// Ends the call as if it had not happened (SAM's first step still pending, its
    /// claims back), as the error its kernel reported.
    pub fn fail(mut self, error: NormError) -> PyErr {
        let error = self.prepared.norm_error(error);
        self.prepared.release(&mut self.tables);
        if let Some(claims) = self.restarting_claims {
            *claims = self.prepared.pending_claims();
        }
        error
    }

    /// Commits the slots and SAM's part: its pending set ended, its call counted.
    pub fn commit(mut self) {
        self.prepared.commit(&mut self.tables);
        drop(self.tables);
        if let Some((pending, calls, counts)) = self.count {
            if self.restart {
                *pending = None;
            }
            *calls += u64::from(counts);
        }
    }
}

/// One base-optimizer step of spec `S`: a plain one, or SAM's second step with its restore
/// fused in. Commits the slots, the step count, SAM's pending set and its call count.
fn base_step_of<const N: usize, S: Spec<N>>(
    py: Python<'_>,
    base: &mut Engine,
    sam: Option<SamPart<'_>>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let Engine {
        kind,
        groups,
        assign,
        clipping,
        steps,
        table,
        order,
        cache,
        averaged,
    } = base;
    if *averaged {
        return Err(protocol_error(
            "the parameters hold Schedule-Free's average (eval() was called): call train() \
             before stepping",
        ));
    }
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: groups.len(),
    };
    let base = BaseTable {
        table,
        order,
        cache,
    };
    let mut call = prepare_base_call(base, &S::SLOTS, sam, &assigned, params, grads)?;
    let counted = kind.counts_steps() && !call.prepared.names.is_empty();
    let t = *steps + u64::from(counted);
    let carried: Vec<Hyper> = match counted {
        true => groups.iter().map(|hyper| S::carry(hyper, t)).collect(),
        false => groups.clone(),
    };
    let specs: Vec<GroupStep<S>> = carried
        .iter()
        .map(|hyper| GroupStep {
            spec: S::at_step(hyper, t),
            l2: S::l2(hyper),
        })
        .collect();
    let clipping = *clipping;
    let (restart, gsam) = (call.restart, call.gsam);
    let mix = gsam.is_some();
    let items = call.prepared.lanes(
        |e| update_lanes::<f32, N>(e, restart, mix),
        |e| update_lanes::<f64, N>(e, restart, mix),
    );
    let outcome = py.detach(move || phases::base_step(items, &specs, clipping, gsam));
    if let Err(error) = outcome {
        return Err(call.fail(error));
    }
    call.commit();
    *steps = t;
    *groups = carried;
    Ok(())
}

fn base_step(
    py: Python<'_>,
    base: &mut Engine,
    sam: Option<SamPart<'_>>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    match base.kind {
        Kind::Sgd => base_step_of::<1, Sgd>(py, base, sam, params, grads),
        Kind::Adam => base_step_of::<2, Adam<false>>(py, base, sam, params, grads),
        Kind::AdamW => base_step_of::<2, Adam<true>>(py, base, sam, params, grads),
        Kind::Adagrad => base_step_of::<1, Adagrad>(py, base, sam, params, grads),
        Kind::RmsProp => base_step_of::<1, RmsProp>(py, base, sam, params, grads),
        Kind::NAdam => base_step_of::<2, NAdam>(py, base, sam, params, grads),
        Kind::AdaMax => base_step_of::<2, AdaMax>(py, base, sam, params, grads),
        Kind::RAdam => base_step_of::<2, RAdam>(py, base, sam, params, grads),
        Kind::AdaBelief => base_step_of::<2, AdaBelief>(py, base, sam, params, grads),
        Kind::Lion => base_step_of::<1, Lion>(py, base, sam, params, grads),
        Kind::ScheduleFreeAdamW => {
            base_step_of::<2, ScheduleFreeAdamW>(py, base, sam, params, grads)
        }
    }
}

/// A base optimizer's step: updates every array of `params` in place.
#[pyfunction]
fn step(
    py: Python<'_>,
    engine: &Bound<'_, PyAny>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
) -> PyResult<()> {
    if let Ok(layered) = engine.cast::<LayerEngine>() {
        return layerwise::layer_step(py, &mut *borrow(layered)?, None, params, grads);
    }
    if let Ok(prodigy) = engine.cast::<ProdigyEngine>() {
        return prodigy::prodigy_step(py, &mut *borrow(prodigy)?, None, params, grads);
    }
    base_step(
        py,
        &mut *borrow(engine.cast::<Engine>()?)?,
        None,
        params,
        grads,
    )
}

fn perturb_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> PerturbLanes<'a, T> {
    let group = entry.group;
    let (param, grad, states) = entry.lanes();
    let mut states = states.into_iter();
    let saved = states.next().expect("saved values");
    let grad = grad.expect("first_step has gradients");
    (param, grad, saved, states.next(), group)
}

/// SAM's first phase (`phases::perturb`); commits the saved values and the pending set.
/// Returns the norm; when it is zero nothing changes and nothing is pending.
fn perturb(
    py: Python<'_>,
    sam: &mut SamEngine,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    rho: f64,
    eps: f64,
) -> PyResult<f64> {
    if sam.state.pending.is_some() {
        return Err(protocol_error(
            "first_step called twice without second_step: the parameters are already \
             perturbed (call second_step, or restore to abandon the step)",
        ));
    }
    let uses = sam_uses(0, sam.keeps_grad0, Policy::Scratch);
    let SamEngine {
        state,
        order,
        cache,
        keeps_grad0,
        groups,
        assign,
    } = sam;
    let mut tables = [TableRef {
        table: &mut state.table,
        cache,
    }];
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: groups.len(),
    };
    let pending = None;
    let mut prepared = prepare(
        params,
        Some(order),
        Some(grads),
        &mut tables,
        &uses,
        pending,
        &assigned,
    )?;
    let items = prepared.lanes(perturb_lanes::<f32>, perturb_lanes::<f64>);
    let norm = match py.detach(move || phases::perturb(items, groups, rho, eps)) {
        Ok(norm) if norm > 0.0 => norm,
        Ok(_) => {
            prepared.release(&mut tables);
            return Ok(0.0);
        }
        Err(error) => {
            let error = prepared.norm_error(error);
            prepared.release(&mut tables);
            return Err(error);
        }
    };
    let entries = prepared.commit(&mut tables).swap_remove(0);
    state.pending = Some(entries);
    state.pending_claims = prepared.pending_claims();
    if *keeps_grad0 {
        state.grad0_norm = norm;
    }
    Ok(norm)
}

/// SAM's first phase: moves the parameters by the ascent, saving their exact values.
/// `rho` is the optimizer's radius (its groups' are multiples of it).
#[pyfunction]
#[pyo3(signature = (sam, params, grads, rho, eps))]
fn first_step(
    py: Python<'_>,
    sam: &Bound<'_, SamEngine>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    rho: f64,
    eps: f64,
) -> PyResult<f64> {
    perturb(py, &mut *borrow(sam)?, params, grads, rho, eps)
}

fn restore_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> CopyLanes<'a, T> {
    let (param, _, states) = entry.lanes();
    let saved = states.into_iter().next().expect("saved values");
    (param, saved)
}

/// Puts the parameters of the pending first_step back to their saved values, bit for bit.
fn restore_pending(
    py: Python<'_>,
    sam: &mut SamEngine,
    params: &Bound<'_, PyDict>,
) -> PyResult<()> {
    let Some(expected) = sam.state.pending.clone() else {
        return Ok(());
    };
    let uses = sam_uses(0, false, Policy::Required);
    let SamEngine {
        state,
        order,
        cache,
        ..
    } = sam;
    let mut tables = [TableRef {
        table: &mut state.table,
        cache,
    }];
    let pending = Some(Pending {
        table: 0,
        entries: &expected,
        claims: &mut state.pending_claims,
    });
    let mut prepared = prepare(
        params,
        Some(order),
        None,
        &mut tables,
        &uses,
        pending,
        &UNGROUPED,
    )?;
    let items = prepared.lanes(restore_lanes::<f32>, restore_lanes::<f64>);
    py.detach(move || phases::copy(items));
    prepared.commit(&mut tables);
    state.pending = None;
    Ok(())
}

/// Abandons a pending perturbation: the parameters go back to their values before
/// first_step, bit for bit.
#[pyfunction]
fn restore(py: Python<'_>, sam: &Bound<'_, SamEngine>, params: &Bound<'_, PyDict>) -> PyResult<()> {
    restore_pending(py, &mut *borrow(sam)?, params)
}

/// The buffers that keep a parameter's perturbed values while a base written in Python
/// steps, one per entry, allocated before anything is written.
fn kept_values<T: Float>(entries: &[Entry<'_, T>], names: &[Key<'_>]) -> PyResult<Vec<Box<[T]>>> {
    entries
        .iter()
        .map(|entry| {
            let len = entry.param.shape().iter().product();
            state::zeroed::<T>(len).map_err(|error| {
                names[entry.item].out_of_memory("a copy of the perturbed parameter", error)
            })
        })
        .collect()
}

/// GSAM's gradient for a base written in Python: a new array per parameter, of its dtype,
/// shape and layout.
fn direction_arrays<'py, T: Float>(
    py: Python<'py>,
    entries: &[Entry<'_, T>],
    names: &[Key<'_>],
) -> PyResult<Vec<Bound<'py, PyArrayDyn<T>>>> {
    entries
        .iter()
        .map(|entry| {
            let name = names[entry.item].text();
            let fortran = entry.param.order().fortran();
            arrays::new_array::<T>(py, entry.param.shape(), fortran, &name)
        })
        .collect()
}

/// A new array's values, for the kernels to write.
fn slice_of<'a, T: Element>(array: &'a mut Bound<'_, PyArrayDyn<T>>) -> &'a mut [T] {
    // SAFETY: an array this call made, contiguous, not yet seen by any other code.
    unsafe { array.as_slice_mut() }.expect("a new contiguous array")
}

fn mix_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>, out: &'a mut [T]) -> MixLanes<'a, T> {
    let (_, grad, states) = entry.lanes();
    let grad0 = states.into_iter().nth(1).expect("GSAM keeps g0");
    (out, grad.expect("GSAM's second step has gradients"), grad0)
}

fn keeping_lanes<'a, T: Float>(
    entry: &'a mut Entry<'_, T>,
    kept: &'a mut [T],
) -> RestoreKeepingLanes<'a, T> {
    let (param, _, states) = entry.lanes();
    let saved = states.into_iter().next().expect("saved values");
    (param, kept, saved)
}

fn put_back_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>, kept: &'a [T]) -> CopyLanes<'a, T> {
    (entry.lanes().0, kept)
}

/// The perturbed values of the float32 and of the float64 parameters, in entry order.
type KeptValues = (Vec<Box<[f32]>>, Vec<Box<[f64]>>);

/// What a base written in Python gets and what is kept while it steps.
struct ForeignStep<'py> {
    prepared: Prepared<'py>,
    kept: KeptValues,
    grads: Bound<'py, PyDict>,
}

/// Everything before a base written in Python steps: GSAM's gradient for it, the
/// perturbed values kept, the restore. Commits the saved values back (still pending).
fn before_foreign_step<'py>(
    py: Python<'py>,
    sam: &mut SamEngine,
    params: &Bound<'py, PyDict>,
    grads: &Bound<'py, PyDict>,
    alpha: Option<f64>,
) -> PyResult<ForeignStep<'py>> {
    let expected = sam.state.pending.clone().unwrap_or_default();
    let uses = sam_uses(0, alpha.is_some(), Policy::Required);
    let SamEngine {
        state,
        order,
        cache,
        ..
    } = sam;
    let grad0_norm = state.grad0_norm;
    let mut tables = [TableRef {
        table: &mut state.table,
        cache,
    }];
    let gradients = alpha.is_some().then_some(grads);
    let pending = Some(Pending {
        table: 0,
        entries: &expected,
        claims: &mut state.pending_claims,
    });
    let mut prepared = prepare(
        params,
        Some(order),
        gradients,
        &mut tables,
        &uses,
        pending,
        &UNGROUPED,
    )?;
    let buffers = (|| -> PyResult<_> {
        let names = &prepared.names;
        let kept = (
            kept_values(&prepared.singles, names)?,
            kept_values(&prepared.doubles, names)?,
        );
        let directions = match alpha {
            Some(_) => Some((
                direction_arrays(py, &prepared.singles, names)?,
                direction_arrays(py, &prepared.doubles, names)?,
            )),
            None => None,
        };
        Ok((kept, directions))
    })();
    let (mut kept, mut directions) = match buffers {
        Ok(buffers) => buffers,
        Err(error) => {
            prepared.release(&mut tables);
            state.pending_claims = prepared.pending_claims();
            return Err(error);
        }
    };
    if let (Some(alpha), Some((singles, doubles))) = (alpha, &mut directions) {
        let (mut singles, mut doubles) = (singles.iter_mut(), doubles.iter_mut());
        let items = prepared.lanes(
            |e| mix_lanes(e, slice_of(singles.next().expect("one per entry"))),
            |e| mix_lanes(e, slice_of(doubles.next().expect("one per entry"))),
        );
        let gsam = GsamInputs { alpha, grad0_norm };
        if let Err(error) = py.detach(move || phases::gsam_direction(items, gsam)) {
            let error = prepared.norm_error(error);
            prepared.release(&mut tables);
            state.pending_claims = prepared.pending_claims();
            return Err(error);
        }
    }
    let (mut singles, mut doubles) = (kept.0.iter_mut(), kept.1.iter_mut());
    let items = prepared.lanes(
        |e| keeping_lanes(e, singles.next().expect("one per entry")),
        |e| keeping_lanes(e, doubles.next().expect("one per entry")),
    );
    py.detach(move || phases::restore_keeping(items));
    prepared.commit(&mut tables);
    let grads = match directions {
        Some((singles, doubles)) => {
            let out = PyDict::new(py);
            let (mut singles, mut doubles) = (singles.into_iter(), doubles.into_iter());
            for (key, &single) in prepared.names.iter().zip(&prepared.is_single) {
                let array = match single {
                    true => singles.next().expect("one per entry").into_any(),
                    false => doubles.next().expect("one per entry").into_any(),
                };
                out.set_item(&key.0, array)?;
            }
            out
        }
        None => grads.clone(),
    };
    Ok(ForeignStep {
        prepared,
        kept,
        grads,
    })
}

/// SAM's second phase over a base written in Python: restores the saved values, then
/// calls `base.step` (with GSAM's mixed gradient when `alpha` is set). If it raises, the
/// perturbed values are put back and the step stays pending; if it returns, the step is
/// committed (and, with `count`, one more `sam_step` call).
fn foreign_second_step(
    py: Python<'_>,
    sam_object: &Bound<'_, SamEngine>,
    base: &Bound<'_, PyAny>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    alpha: Option<f64>,
    count: bool,
) -> PyResult<()> {
    let pending = borrow(sam_object)?.state.pending.is_some();
    if !pending {
        base.call_method1("step", (params, grads))?;
        borrow(sam_object)?.state.calls += u64::from(count);
        return Ok(());
    }
    let mut step = before_foreign_step(py, &mut *borrow(sam_object)?, params, grads, alpha)?;
    // The base may run samopt calls on these arrays, or on this optimizer.
    step.prepared.unclaim();
    match base.call_method1("step", (params, &step.grads)) {
        Ok(_) => {
            let mut sam = borrow(sam_object)?;
            sam.state.pending = None;
            sam.state.calls += u64::from(count);
            Ok(())
        }
        Err(error) => {
            let ForeignStep {
                mut prepared, kept, ..
            } = step;
            prepared.reclaim()?;
            let (mut singles, mut doubles) = (kept.0.iter(), kept.1.iter());
            let items = prepared.lanes(
                |e| put_back_lanes(e, singles.next().expect("one per entry")),
                |e| put_back_lanes(e, doubles.next().expect("one per entry")),
            );
            py.detach(move || phases::copy(items));
            prepared.write_back();
            borrow(sam_object)?.state.pending_claims = prepared.pending_claims();
            Err(error)
        }
    }
}

/// SAM's second phase (or, with nothing pending, a plain base step) over `base`: a native
/// engine, the restore fused into its update, or an optimizer written in Python.
fn second_step_over(
    py: Python<'_>,
    sam_object: &Bound<'_, SamEngine>,
    base: &Bound<'_, PyAny>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    alpha: Option<f64>,
    count: bool,
) -> PyResult<()> {
    if let Ok(layered) = base.cast::<LayerEngine>() {
        let mut sam = borrow(sam_object)?;
        let mut engine = borrow(layered)?;
        let restart = sam.state.pending.is_some();
        let part = SamPart {
            sam: &mut sam,
            restart,
            alpha,
            count,
        };
        return layerwise::layer_step(py, &mut engine, Some(part), params, grads);
    }
    if let Ok(prodigy) = base.cast::<ProdigyEngine>() {
        let mut sam = borrow(sam_object)?;
        let mut engine = borrow(prodigy)?;
        let restart = sam.state.pending.is_some();
        let part = SamPart {
            sam: &mut sam,
            restart,
            alpha,
            count,
        };
        return prodigy::prodigy_step(py, &mut engine, Some(part), params, grads);
    }
    let Ok(engine) = base.cast::<Engine>() else {
        return foreign_second_step(py, sam_object, base, params, grads, alpha, count);
    };
    let mut sam = borrow(sam_object)?;
    let mut engine = borrow(engine)?;
    let restart = sam.state.pending.is_some();
    let part = SamPart {
        sam: &mut sam,
        restart,
        alpha,
        count,
    };
    base_step(py, &mut engine, Some(part), params, grads)
}

/// SAM's second phase: restores the parameters exactly and steps the base with `grads`;
/// with `count`, as the last phase of a step made in Python (the SAM family's), it also
/// counts one more `sam_step` call.
#[pyfunction]
#[pyo3(signature = (sam, base, params, grads, alpha, count = false))]
fn second_step(
    py: Python<'_>,
    sam: &Bound<'_, SamEngine>,
    base: &Bound<'_, PyAny>,
    params: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    alpha: Option<f64>,
    count: bool,
) -> PyResult<()> {
    second_step_over(py, sam, base, params, grads, alpha, count)
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_default()
}

/// `collections.abc.Mapping`, looked up once.
fn mapping_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static MAPPING: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    MAPPING.import(py, "collections.abc", "Mapping")
}

/// `grad_fn(params) -> (loss, grads)`, its grads as a dict.
fn gradients<'py>(
    grad_fn: &Bound<'py, PyAny>,
    params: &Bound<'py, PyDict>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
    let py = params.py();
    let result = grad_fn.call1((params,))?;
    let pair = match result.cast::<PyTuple>() {
        Ok(pair) if pair.len() == 2 => pair,
        _ => {
            let got = type_name(&result);
            return Err(optimizer_error(
                "grad_fn",
                format!("grad_fn must return (loss, grads), got {got}"),
            ));
        }
    };
    let (loss, grads) = (pair.get_item(0)?, pair.get_item(1)?);
    if let Ok(dict) = grads.cast::<PyDict>() {
        return Ok((loss, dict.clone()));
    }
    if grads.is_instance(mapping_type(py)?)? {
        let dict = PyDict::new(py);
        dict.update(grads.cast()?)?;
        return Ok((loss, dict));
    }
    Err(optimizer_error(
        "grads",
        format!(
            "grads must be a mapping of str to numpy.ndarray, got {}",
            type_name(&grads)
        ),
    ))
}

/// One whole SAM step: `grad_fn` at the current point, first_step, `grad_fn` at the
/// perturbed point, second_step; every `interval`-th call (the first included) a SAM step,
/// the others a plain base step. Returns the first loss. Should anything raise — the
/// gradient function too, Ctrl-C included — the parameters go back to where they were and
/// nothing stays pending; when the call returns, the step and the call count are
/// committed.
#[pyfunction]
#[pyo3(signature = (sam, base, params, grad_fn, rho, eps, alpha, interval))]
#[allow(clippy::too_many_arguments)]
fn sam_step<'py>(
    py: Python<'py>,
    sam: &Bound<'py, SamEngine>,
    base: &Bound<'py, PyAny>,
    params: &Bound<'py, PyDict>,
    grad_fn: &Bound<'py, PyAny>,
    rho: f64,
    eps: f64,
    alpha: Option<f64>,
    interval: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let calls = {
        let engine = borrow(sam)?;
        if engine.state.pending.is_some() {
            return Err(protocol_error(
                "sam_step called while a first_step is pending (call second_step or restore \
                 first)",
            ));
        }
        engine.state.calls
    };
    let (loss, grads) = gradients(grad_fn, params)?;
    if calls % interval.max(1) != 0 {
        second_step_over(py, sam, base, params, &grads, alpha, true)?;
        return Ok(loss);
    }
    perturb(py, &mut *borrow(sam)?, params, &grads, rho, eps)?;
    let finished = gradients(grad_fn, params)
        .and_then(|(_, grads)| second_step_over(py, sam, base, params, &grads, alpha, true));
    if let Err(error) = finished {
        if let Err(failed) = restore_pending(py, &mut *borrow(sam)?, params) {
            failed.set_cause(py, Some(error));
            return Err(failed);
        }
        return Err(error);
    }
    Ok(loss)
}

/// `compute_gradient_norm`: the global L2 norm of a dict of gradients, NaN if any element
/// is NaN, infinity if any is infinite.
#[pyfunction]
fn gradient_norm(py: Python<'_>, grads: &Bound<'_, PyDict>) -> PyResult<f64> {
    let entries = sorted_entries(grads, None)?;
    let mut names = Vec::with_capacity(entries.len());
    let mut arrays = Vec::with_capacity(entries.len());
    let mut claims = Vec::with_capacity(entries.len());
    for (item, (key, object)) in entries.into_iter().enumerate() {
        let array = norm_gradient(object, &key)?;
        claims.push(arrays::claim_of(&array, false, item));
        arrays.push(array);
        names.push(key);
    }
    let _registration =
        claims::register(Arc::new(CallClaims::new(claims))).map_err(|conflict| {
            arrays::shared_memory_error("gradient", &names[conflict.item].text())
        })?;
    let sources = arrays
        .into_iter()
        .zip(&names)
        .map(|(array, key)| norm_source(array, key))
        .collect::<PyResult<Vec<_>>>()?;
    let items: Vec<NormItem<'_>> = sources
        .iter()
        .map(|source| match source {
            NormSource::Single(s) => ByDtype::Single((s.slice(), None)),
            NormSource::Double(s) => ByDtype::Double((s.slice(), None)),
        })
        .collect();
    Ok(py.detach(|| phases::gradient_norm(&items)))
}

/// The sorted order of a dict's keys, kept for a caller that passes the same dict call
/// after call (`GradAccumulator`): it skips sorting them again.
#[pyclass(module = "samopt._core")]
#[derive(Default)]
pub struct Names(NameOrder);

#[pymethods]
impl Names {
    #[new]
    fn new() -> Names {
        Names::default()
    }
}

/// A call that writes `arrays` (reading `sources`) and holds no optimizer state.
pub(super) fn prepare_stateless<'py>(
    names: &mut Names,
    arrays: &Bound<'py, PyDict>,
    sources: Option<&Bound<'py, PyDict>>,
) -> PyResult<Prepared<'py>> {
    let order = Some(&mut names.0);
    prepare(arrays, order, sources, &mut [], &[], None, &UNGROUPED)
}

fn pair_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> CopyLanes<'a, T> {
    let (dst, src, _) = entry.lanes();
    (dst, src.expect("a call with a source"))
}

fn values_of<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> &'a mut [T] {
    entry.lanes().0
}

/// Gradient accumulation: `sums[k] += weight·grads[k]` for every array of `sums`, the
/// gradients converted to the sums' dtype; none of them changes unless every gradient is
/// finite.
#[pyfunction]
fn accumulate(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    sums: &Bound<'_, PyDict>,
    grads: &Bound<'_, PyDict>,
    weight: f64,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, sums, Some(grads))?;
    let items = prepared.lanes(pair_lanes::<f32>, pair_lanes::<f64>);
    if let Err(error) = py.detach(move || phases::accumulate(items, weight)) {
        return Err(prepared.norm_error(error));
    }
    prepared.commit(&mut []);
    Ok(())
}

/// `out[k] = factor·values[k]` for every array of `out`.
#[pyfunction]
fn scale(
    py: Python<'_>,
    names: &Bound<'_, Names>,
    out: &Bound<'_, PyDict>,
    values: &Bound<'_, PyDict>,
    factor: f64,
) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, out, Some(values))?;
    let items = prepared.lanes(pair_lanes::<f32>, pair_lanes::<f64>);
    py.detach(move || phases::scale(items, factor));
    prepared.commit(&mut []);
    Ok(())
}

/// Every array of `arrays` set to zero.
#[pyfunction]
fn zero(py: Python<'_>, names: &Bound<'_, Names>, arrays: &Bound<'_, PyDict>) -> PyResult<()> {
    let mut prepared = prepare_stateless(&mut *borrow(names)?, arrays, None)?;
    let items = prepared.lanes(values_of::<f32>, values_of::<f64>);
    py.detach(move || phases::zero(items));
    prepared.commit(&mut []);
    Ok(())
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(accumulate, module)?)?;
    module.add_function(wrap_pyfunction!(scale, module)?)?;
    module.add_function(wrap_pyfunction!(zero, module)?)?;
    module.add_class::<Names>()?;
    module.add_function(wrap_pyfunction!(step, module)?)?;
    module.add_function(wrap_pyfunction!(first_step, module)?)?;
    module.add_function(wrap_pyfunction!(second_step, module)?)?;
    module.add_function(wrap_pyfunction!(restore, module)?)?;
    module.add_function(wrap_pyfunction!(sam_step, module)?)?;
    module.add_function(wrap_pyfunction!(gradient_norm, module)?)?;
    module.add_class::<Engine>()?;
    module.add_class::<SamEngine>()?;
    module.add_class::<StagedSamState>()?;
    Ok(())
}
