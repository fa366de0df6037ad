//! Lookahead's entry point and native state: the slow weights, in a table of their own,
//! and the step counter. One call makes a whole Lookahead step — the slow weights of
//! parameters seen for the first time, the inner optimizer's step (a Python callable),
//! the count and, every `k`-th step, the synchronisation — so that the step commits
//! inside it. The arithmetic is in `crate::lookahead`.

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::arrays::{self, key_text, Float, NameOrder};
use super::driver::{prepare, Entry, EntryCache, Groups, Policy, TableRef, Use};
use super::engine::{busy, export_table};
use super::statedict::import_table;
use super::{optimizer_error, OptimizerError};
use crate::kernels::CopyLanes;
use crate::lookahead::{self, SyncLanes};
use crate::phases;
use crate::state::Table;

const SLOTS: [&str; 1] = ["slow_"];

const UNGROUPED: Groups<'static, 'static> = Groups {
    assign: None,
    count: 1,
};

/// LookaheadOptimizer's native state.
#[pyclass(module = "samopt._core")]
pub struct LookaheadEngine {
    /// The slow weights (slot 0), by parameter name.
    table: Table,
    /// Inner steps taken (the crate's `step_counter`).
    steps: u64,
    order: NameOrder,
    cache: EntryCache,
}

/// A Lookahead state read from a state dict, not yet in force.
#[pyclass(module = "samopt._core")]
pub struct StagedLookahead(Option<(Table, u64)>);

#[pymethods]
impl LookaheadEngine {
    #[new]
    fn new() -> LookaheadEngine {
        LookaheadEngine {
            table: Table::new(SLOTS.len()),
            steps: 0,
            order: NameOrder::default(),
            cache: EntryCache::default(),
        }
    }

    /// Inner steps taken.
    #[getter]
    fn steps(&self) -> u64 {
        self.steps
    }

    /// `step_counter` and the slow weights `slow_<name>`, copied.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let steps = [self.steps as i64];
        let counter = arrays::array_from::<i64>(py, &steps, &[], false, "step_counter")?;
        out.set_item("step_counter", counter)?;
        export_table(py, &self.table, &SLOTS, None, &out, None)?;
        Ok(out)
    }

    /// A state made of a state dict's values, checked and copied: `entries` maps each name
    /// to a 1-tuple with its slow weights.
    fn stage(&self, steps: u64, entries: &Bound<'_, PyDict>) -> PyResult<StagedLookahead> {
        Ok(StagedLookahead(Some((
            import_table(entries, &SLOTS)?,
            steps,
        ))))
    }

    /// Puts a staged state in force (it cannot fail: everything was checked and copied).
    fn install(&mut self, staged: &mut StagedLookahead) -> PyResult<()> {
        let (table, steps) = staged
            .0
            .take()
            .ok_or_else(|| optimizer_error("state", "this state was installed already".into()))?;
        self.table = table;
        self.steps = steps;
        Ok(())
    }
}

fn engine_of<'py>(
    engine: &Bound<'py, LookaheadEngine>,
) -> PyResult<PyRefMut<'py, LookaheadEngine>> {
    engine.try_borrow_mut().map_err(|_| busy())
}

/// The parameters of `params` that have no slow weights yet. Those that have must fit
/// them (dtype and shape), checked before the inner step so a misfit changes nothing.
fn unseen<'py>(table: &Table, params: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let fresh = PyDict::new(params.py());
    for (key, value) in params.iter() {
        let Ok(name) = key.cast::<PyString>() else {
            // The driver's own check names the key.
            fresh.set_item(key, value)?;
            continue;
        };
        let name = key_text(name)?;
        let slow = table
            .find(&name)
            .and_then(|entry| table.entry(entry).buffers[0].as_ref());
        let Some(slow) = slow else {
            fresh.set_item(key, value)?;
            continue;
        };
        if let Ok(array) = value.cast::<PyUntypedArray>() {
            let dtype = arrays::dtype_name(array);
            if dtype != slow.data.dtype() || !arrays::same_shape(&slow.shape, array.shape()) {
                let state = format!("{}{name}", SLOTS[0]);
                return Err(optimizer_error(
                    &state,
                    format!(
                        "state '{state}' has dtype {} and shape {} but parameter '{name}' has \
                         dtype {dtype} and shape {}",
                        slow.data.dtype(),
                        arrays::describe_shape(&slow.shape),
                        arrays::describe_shape(array.shape())
                    ),
                ));
            }
        }
    }
    Ok(fresh)
}

fn snapshot_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> CopyLanes<'a, T> {
    let (param, _, states) = entry.lanes();
    let slow = states.into_iter().next().expect("the slow weights");
    (slow, &*param)
}

/// The slow weights of every parameter of `fresh`: a copy of its current values. Returns
/// their names, to forget them should the inner step fail.
fn snapshot(
    py: Python<'_>,
    engine: &mut LookaheadEngine,
    fresh: &Bound<'_, PyDict>,
) -> PyResult<Vec<String>> {
    let uses = [Use {
        table: 0,
        slot: 0,
        prefix: SLOTS[0],
        policy: Policy::Scratch,
    }];
    let LookaheadEngine { table, cache, .. } = engine;
    let mut tables = [TableRef { table, cache }];
    let mut prepared = prepare(fresh, None, None, &mut tables, &uses, None, &UNGROUPED)?;
    let items = prepared.lanes(snapshot_lanes::<f32>, snapshot_lanes::<f64>);
    py.detach(move || phases::copy(items));
    prepared.commit(&mut tables);
    Ok(prepared.names.iter().map(|key| key.text()).collect())
}

/// Drops the slow weights of `names` (made by a snapshot whose step failed).
fn forget(engine: &mut LookaheadEngine, names: &[String]) {
    for name in names {
        if let Some(entry) = engine.table.find(name) {
            engine.table.entry_mut(entry).buffers[0] = None;
        }
    }
}

fn sync_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> SyncLanes<'a, T> {
    let (param, _, states) = entry.lanes();
    let slow = states.into_iter().next().expect("the slow weights");
    (param, slow)
}

/// `φ ← φ + α·(θ − φ) ; θ ← φ` for every parameter of `params`.
fn synchronise(
    py: Python<'_>,
    engine: &mut LookaheadEngine,
    params: &Bound<'_, PyDict>,
    alpha: f64,
) -> PyResult<()> {
    let uses = [Use {
        table: 0,
        slot: 0,
        prefix: SLOTS[0],
        policy: Policy::Required,
    }];
    let LookaheadEngine {
        table,
        cache,
        order,
        ..
    } = engine;
    let mut tables = [TableRef { table, cache }];
    let order = Some(order);
    let mut prepared = prepare(params, order, None, &mut tables, &uses, None, &UNGROUPED)?;
    let items = prepared.lanes(sync_lanes::<f32>, sync_lanes::<f64>);
    py.detach(move || lookahead::synchronise(items, alpha));
    prepared.commit(&mut tables);
    Ok(())
}

/// One Lookahead call around `inner()`, the inner optimizer's phase: parameters without
/// slow weights get them (their values now), then `inner()` runs; if it raises, those slow
/// weights are forgotten. With `advance` the call counts one step and, every `k`-th,
/// synchronises. `pending` says the inner optimizer holds perturbed parameters (a SAM
/// `first_step` not made through Lookahead): their values are no slow weights, so new
/// names are refused then. Returns what `inner()` returned.
#[pyfunction]
#[pyo3(signature = (engine, params, inner, alpha, k, advance, pending))]
#[allow(clippy::too_many_arguments)]
fn lookahead_step<'py>(
    py: Python<'py>,
    engine: &Bound<'py, LookaheadEngine>,
    params: &Bound<'py, PyDict>,
    inner: &Bound<'py, PyAny>,
    alpha: f64,
    k: u64,
    advance: bool,
    pending: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let fresh = unseen(&engine_of(engine)?.table, params)?;
    let mut made = Vec::new();
    if !fresh.is_empty() {
        if pending {
            let first = fresh.keys().get_item(0)?.str()?.to_string();
            return Err(OptimizerError::new_err((
                format!(
                    "parameter '{first}' has no slow weights and the inner optimizer's \
                     first_step is pending: its perturbed values are no starting point \
                     (make first_step through LookaheadOptimizer)"
                ),
                first,
            )));
        }
        made = snapshot(py, &mut *engine_of(engine)?, &fresh)?;
    }
    let result = match inner.call0() {
        Ok(result) => result,
        Err(error) => {
            forget(&mut *engine_of(engine)?, &made);
            return Err(error);
        }
    };
    if advance {
        let mut state = engine_of(engine)?;
        let steps = state.steps + 1;
        if steps % k.max(1) == 0 {
            synchronise(py, &mut state, params, alpha)?;
        }
        state.steps = steps;
    }
    Ok(result)
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(lookahead_step, module)?)?;
    module.add_class::<LookaheadEngine>()?;
    module.add_class::<StagedLookahead>()?;
    Ok(())
}
