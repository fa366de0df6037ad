//! The PyO3 layer: one function per optimizer phase, each covering every array of the
//! call. A call runs in three stages:
//!
//! 1. with the GIL: check every key, dtype, shape and layout, and claim the memory of
//!    every array (parameters written, gradients read: a gradient or a second name that
//!    aliases a parameter, or another call in flight on the same memory, is refused
//!    instead of racing), then look up the optimizer's state arrays;
//! 2. without the GIL: a read-only pass (finiteness, norms), then — only if it passed — the
//!    fused write pass;
//! 3. with the GIL: write back arrays that had to be staged and publish new state arrays.
//!
//! Everything that can fail happens before the first write, so an error changes nothing.

use ndarray::{ArrayView, ArrayViewD, ArrayViewMutD, IxDyn, ShapeBuilder};
use numpy::npyffi::{NPY_ARRAY_BEHAVED, NPY_TYPES};
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::os::raw::c_int;
use std::sync::Arc;

use crate::claims::{self, CallClaims, Claim, Registration};
use crate::kernels::{self, Ascent, Clip, Mix, Real, WideFactor};
use crate::norm::{self, DotItem, NormError, NormItem};
use crate::parallel::{for_each, ByDtype};

pyo3::import_exception!(samopt._errors, OptimizerError);
pyo3::import_exception!(samopt._errors, NonFiniteGradientError);

fn optimizer_error(key: &str, message: String) -> PyErr {
    OptimizerError::new_err((message, key.to_owned()))
}

fn non_finite_error(key: &str, message: String) -> PyErr {
    NonFiniteGradientError::new_err((message, key.to_owned()))
}

/// The memory order in which every stream of one parameter is laid out for the kernels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    C,
    F,
}

impl Order {
    /// The parameter's own order when it is contiguous; otherwise it is staged in C order.
    fn of(array: &Bound<'_, PyUntypedArray>) -> Order {
        if !array.is_c_contiguous() && array.is_fortran_contiguous() {
            Order::F
        } else {
            Order::C
        }
    }

    fn holds(self, array: &Bound<'_, PyUntypedArray>) -> bool {
        match self {
            Order::C => array.is_c_contiguous(),
            Order::F => array.is_fortran_contiguous(),
        }
    }

    /// The array's elements in this order, each passed through `convert`. (Boxed slices
    /// keep the entries that hold them small: each is moved a few times per call.)
    fn gather<S: Copy, T>(self, view: ArrayViewD<'_, S>, convert: impl Fn(S) -> T) -> Box<[T]> {
        match self {
            Order::C => view.iter().map(|&x| convert(x)).collect(),
            Order::F => view.t().iter().map(|&x| convert(x)).collect(),
        }
    }

    fn view<'a, T>(self, shape: &[usize], flat: &'a [T]) -> ArrayViewD<'a, T> {
        let shape = IxDyn(shape);
        let view = match self {
            Order::C => ArrayView::from_shape(shape, flat),
            Order::F => ArrayView::from_shape(shape.f(), flat),
        };
        view.expect("a staged buffer has exactly the array's size")
    }
}

/// An array a call writes. No per-array borrow is taken: the call's claims (`claims`) rule
/// out the same memory under two names and another call in flight writing or reading it,
/// and the optimizer's private state arrays (never handed out, only used under its lock)
/// are checked not to overlap any array of the call.
struct Access<'py, T: Element>(Bound<'py, PyArrayDyn<T>>);

impl<'py, T: Element> Access<'py, T> {
    fn untyped(&self) -> &Bound<'py, PyUntypedArray> {
        self.0.cast::<PyUntypedArray>().expect("a numpy array")
    }

    fn view(&self) -> ArrayViewD<'_, T> {
        // SAFETY: nothing else reads or writes the array during the call (claims).
        unsafe { self.0.as_array() }
    }

    fn view_mut(&mut self) -> ArrayViewMutD<'_, T> {
        // SAFETY: as for `view`.
        unsafe { self.0.as_array_mut() }
    }

    fn slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `view`.
        let slice = unsafe { self.0.as_slice_mut() };
        slice.expect("layout checked when staged")
    }
}

/// A stream the kernels write: the array itself when its layout fits, else a staged copy
/// that is written back after the kernels.
struct Target<'py, T: Element> {
    access: Access<'py, T>,
    staged: Option<Box<[T]>>,
    order: Order,
}

impl<'py, T: Element + Copy> Target<'py, T> {
    fn new(access: Access<'py, T>, order: Order) -> Self {
        let fits = order.holds(access.untyped());
        let staged = (!fits).then(|| order.gather(access.view(), |x| x));
        Target {
            access,
            staged,
            order,
        }
    }

    fn shape(&self) -> &[usize] {
        self.access.untyped().shape()
    }

    fn slice(&mut self) -> &mut [T] {
        match &mut self.staged {
            Some(buffer) => buffer,
            None => self.access.slice_mut(),
        }
    }

    fn write_back(&mut self) {
        if let Some(buffer) = &self.staged {
            let shape = self.shape().to_vec();
            self.access
                .view_mut()
                .assign(&self.order.view(&shape, buffer));
        }
    }
}

/// The address of the array's first element.
fn data_address(array: &Bound<'_, PyUntypedArray>) -> usize {
    // SAFETY: reads the data pointer of a live NumPy array object.
    unsafe { (*array.as_array_ptr()).fields.data as usize }
}

/// What an array of the call claims: its bytes, its stride lattice, and whether it is
/// written. `item` is its position in the call.
fn claim_of(array: &Bound<'_, PyUntypedArray>, write: bool, item: usize) -> Claim {
    let data = data_address(array);
    let itemsize = match descr(array).type_num {
        n if n == f64::TYPE_NUM as c_int => 8,
        n if n == f32::TYPE_NUM as c_int => 4,
        _ => array.dtype().itemsize(),
    };
    Claim::of(data, array.shape(), array.strides(), itemsize, write, item)
}

/// The bytes an array of `T` spans, `[lowest, highest + itemsize)`; empty for size 0.
/// Read straight off a contiguous array (state arrays are), which is checked per state
/// array and call.
fn extent<T: Float>(array: &Bound<'_, PyUntypedArray>) -> (usize, usize) {
    if array.is_contiguous() {
        let data = data_address(array);
        return (data, data + array.len() * std::mem::size_of::<T>());
    }
    let claim = claim_of(array, false, 0);
    (claim.start, claim.end)
}

/// A stream the kernels only read, staged the same way.
/// A gradient of another dtype is converted into such a staged copy (no array borrowed).
enum Source<'py, T: Element> {
    /// The caller's array, read in place (no call in flight writes it: claims).
    Array(Bound<'py, PyArrayDyn<T>>),
    Staged(Box<[T]>),
}

/// The array's elements, read without a borrow: the caller checked the claims.
fn read_view<'a, T: Element>(array: &'a Bound<'_, PyArrayDyn<T>>) -> ArrayViewD<'a, T> {
    // SAFETY: no call in flight writes the array (claims), and this call does not.
    unsafe { array.as_array() }
}

impl<'py, T: Element + Copy> Source<'py, T> {
    fn new(array: Bound<'py, PyArrayDyn<T>>, order: Order) -> Self {
        let untyped = array.cast::<PyUntypedArray>().expect("a numpy array");
        if order.holds(untyped) {
            Source::Array(array)
        } else {
            Source::Staged(order.gather(read_view(&array), |x| x))
        }
    }

    fn slice(&self) -> &[T] {
        match self {
            Source::Staged(buffer) => buffer,
            // SAFETY: as for `read_view`.
            Source::Array(array) => unsafe { array.as_slice() }.expect("layout checked"),
        }
    }
}

/// How a per-parameter state dict is treated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Optimizer state: created as zeros when absent, an error when it does not fit.
    Lazy,
    /// Scratch buffers (SAM's saved values): created when absent or not fitting.
    Scratch,
    /// Must be present and fit (SAM's pending saved values).
    Required,
}

struct StateSpec<'a, 'py> {
    dict: &'a Bound<'py, PyDict>,
    /// Prefix of the key this state has in a state dict, for error messages.
    prefix: &'static str,
    policy: Policy,
}

/// The most state arrays an entry has: Adam's m and v, SAM's saved values, GSAM's g0.
const MAX_STATES: usize = 4;

/// Up to `MAX_STATES` values of one entry, without a heap allocation per entry and call.
struct Slots<X> {
    items: [Option<X>; MAX_STATES],
    len: usize,
}

impl<X> Slots<X> {
    fn new() -> Self {
        Slots {
            items: std::array::from_fn(|_| None),
            len: 0,
        }
    }

    fn push(&mut self, item: X) {
        self.items[self.len] = Some(item);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<X> {
        self.len = self.len.checked_sub(1)?;
        self.items[self.len].take()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut X> {
        self.items.iter_mut().flatten()
    }
}

/// Everything one parameter brings to a call, laid out for the kernels.
struct Entry<'py, T: Element> {
    param: Target<'py, T>,
    grad: Option<Source<'py, T>>,
    states: Slots<Target<'py, T>>,
}

/// A state array allocated by the call: its entry, its state spec and the array, published
/// in the state dict only on success.
type Created<'py> = (usize, usize, Bound<'py, PyAny>);

/// A validated call whose memory is claimed.
struct Prepared<'py> {
    names: Vec<Key<'py>>,
    /// The entries of the float32 and of the float64 parameters, each in name order (built
    /// in place: an entry is a few hundred bytes), and for each name whether it is float32.
    singles: Vec<Entry<'py, f32>>,
    doubles: Vec<Entry<'py, f64>>,
    is_single: Vec<bool>,
    created: Vec<Created<'py>>,
    /// Holds the call's claims until the call has written everything back.
    _registration: Registration,
}

fn describe_shape(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

fn dtype_name(array: &Bound<'_, PyUntypedArray>) -> String {
    array.dtype().to_string()
}

/// A parameter name: the caller's key object itself, so that lookups in the other dicts
/// reuse its cached hash. Its text is only extracted for messages (the limited API of
/// CPython 3.9, which the wheel targets, has no borrowed UTF-8 view of a str: extracting
/// it costs a copy).
struct Key<'py>(Bound<'py, PyString>);

impl Key<'_> {
    fn text(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// An `OptimizerError` naming this parameter, its message made from the name.
    fn error(&self, message: impl FnOnce(&str) -> String) -> PyErr {
        let name = self.text();
        optimizer_error(&name, message(&name))
    }
}

/// The name order of the last dict a call saw: a call with the same key objects, in the
/// same dict order (an optimizer's parameters, step after step), skips extracting and
/// sorting the names. One per optimizer, used under its lock.
#[pyclass(module = "samopt._core")]
#[derive(Default)]
struct NameOrder {
    /// The key objects in the dict's iteration order, held so that no other object can
    /// take one's address.
    keys: Vec<Py<PyString>>,
    /// Name order: each key's index in `keys`.
    order: Vec<usize>,
}

#[pymethods]
impl NameOrder {
    #[new]
    fn new() -> Self {
        NameOrder::default()
    }
}

impl NameOrder {
    fn matches(&self, keys: &[Bound<'_, PyAny>]) -> bool {
        self.keys.len() == keys.len()
            && self
                .keys
                .iter()
                .zip(keys)
                .all(|(a, b)| a.as_ptr() == b.as_ptr())
    }
}

fn non_str_key(key: &Bound<'_, PyAny>) -> PyErr {
    let shown = key.repr().map(|r| r.to_string()).unwrap_or_default();
    optimizer_error(
        &shown,
        format!(
            "parameter names must be str, got {shown} ({})",
            type_name(key)
        ),
    )
}

/// The dict's keys and values sorted by name, so that results never depend on insertion
/// order.
fn sorted_entries<'py>(
    dict: &Bound<'py, PyDict>,
    cache: Option<&Bound<'py, NameOrder>>,
) -> PyResult<Vec<(Key<'py>, Bound<'py, PyAny>)>> {
    let (mut keys, mut values) = (
        Vec::with_capacity(dict.len()),
        Vec::with_capacity(dict.len()),
    );
    for (key, value) in dict.iter() {
        keys.push(key);
        values.push(value);
    }
    let mut cache = cache.and_then(|cache| cache.try_borrow_mut().ok());
    let mut sorted = Vec::new();
    let known = cache.as_deref().is_some_and(|known| known.matches(&keys));
    if !known {
        let mut texts = Vec::with_capacity(keys.len());
        for key in &keys {
            let text = key
                .cast::<PyString>()
                .map_err(|_| non_str_key(key))?
                .to_cow()?;
            texts.push(text);
        }
        sorted = (0..keys.len()).collect();
        sorted.sort_unstable_by(|&a, &b| texts[a].cmp(&texts[b]));
        if let Some(cache) = cache.as_deref_mut() {
            cache.keys = keys
                .iter()
                .map(|key| {
                    key.cast::<PyString>()
                        .expect("checked above")
                        .clone()
                        .unbind()
                })
                .collect();
            cache.order = std::mem::take(&mut sorted);
        }
    }
    let order = cache.as_deref().map_or(&sorted, |cache| &cache.order);
    // Moved out, not cloned: each reference count change is a call into the interpreter.
    let mut entries: Vec<Option<_>> = keys.into_iter().zip(values).map(Some).collect();
    Ok(order
        .iter()
        .map(|&index| {
            let (key, value) = entries[index].take().expect("each index once");
            let key = key.cast_into::<PyString>().expect("a str key");
            (Key(key), value)
        })
        .collect())
}

/// `name` is only formatted on the error path: it may be built (a state key) per call.
fn as_array<'py, N: AsRef<str>>(
    object: Bound<'py, PyAny>,
    what: &str,
    name: impl FnOnce() -> N,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    object.cast_into::<PyUntypedArray>().map_err(|error| {
        let object = error.into_inner();
        let name = name();
        let name = name.as_ref();
        optimizer_error(
            name,
            format!(
                "{what} '{name}' must be a numpy.ndarray, got {}",
                type_name(&object)
            ),
        )
    })
}

fn shared_memory_error(what: &str, key: &str) -> PyErr {
    optimizer_error(
        key,
        format!(
            "{what} '{key}' shares memory with a parameter of this call (the same array \
             under two names, or a parameter passed as a gradient), or is being updated \
             by another thread"
        ),
    )
}

/// A parameter dtype, identified by NumPy's type number (cheaper than comparing dtype
/// objects, which matters with hundreds of small arrays per call).
trait Float: Element + Real {
    const TYPE_NUM: NPY_TYPES;
}

impl Float for f32 {
    const TYPE_NUM: NPY_TYPES = NPY_TYPES::NPY_FLOAT;
}

impl Float for f64 {
    const TYPE_NUM: NPY_TYPES = NPY_TYPES::NPY_DOUBLE;
}

/// Whether the array holds `T` in native byte order.
fn is_float_dtype<T: Float>(array: &Bound<'_, PyUntypedArray>) -> bool {
    let dtype = descr(array);
    // NumPy's PyArray_ISNBO: '=' native, '|' not applicable, else the machine's own order.
    let native = matches!(dtype.byteorder as u8, b'=' | b'|')
        || dtype.byteorder as u8 == numpy::npyffi::NPY_BYTEORDER_CHAR::NPY_NATBYTE as u8;
    dtype.type_num == T::TYPE_NUM as c_int && native
}

/// The array's dtype fields, read in place: `dtype()` would create a new reference, and
/// these checks run several times per array and call.
fn descr<'a>(array: &'a Bound<'_, PyUntypedArray>) -> &'a numpy::npyffi::PyArray_Descr_fields {
    // SAFETY: a live array holds a reference to its descr; these leading fields are laid
    // out alike in NumPy 1 and 2.
    unsafe { &(*(*array.as_array_ptr()).fields.descr).fields }
}

/// The array as `PyArrayDyn<T>` if it holds `T`. rust-numpy's own cast compares dtype
/// objects through NumPy's API, which with hundreds of small arrays costs more than the
/// work; the type number says the same.
fn typed<'a, 'py, T: Float>(
    array: &'a Bound<'py, PyUntypedArray>,
) -> Option<&'a Bound<'py, PyArrayDyn<T>>> {
    // SAFETY: an ndarray whose elements are `T` in native byte order, of any rank.
    is_float_dtype::<T>(array).then(|| unsafe { array.cast_unchecked() })
}

/// `typed` for an array the caller hands over: no new reference (each reference count
/// change is a call into the interpreter, several per array and call).
fn typed_into<'py, T: Float>(
    array: Bound<'py, PyUntypedArray>,
) -> Option<Bound<'py, PyArrayDyn<T>>> {
    // SAFETY: as for `typed`.
    is_float_dtype::<T>(&array).then(|| unsafe { array.cast_into_unchecked() })
}

/// Whether the array's flags have all of `flags` set.
fn has_flags(array: &Bound<'_, PyUntypedArray>, flags: c_int) -> bool {
    // SAFETY: reads the flags field of a live NumPy array object.
    let set = unsafe { (*array.as_array_ptr()).fields.flags };
    set & flags == flags
}

/// Whether Rust may view the array's memory as `&[T]`: native byte order (which
/// `is_float_dtype` checks) and aligned elements.
fn is_aligned(array: &Bound<'_, PyUntypedArray>) -> bool {
    has_flags(array, numpy::npyffi::NPY_ARRAY_ALIGNED)
}

/// A float gradient as a native, aligned float32 or float64 array: the array itself when it
/// already is one, else a NumPy copy (float16 widens to float32 exactly; byte-swapped or
/// unaligned arrays are copied at their own precision).
fn native_float<'py>(array: Bound<'py, PyUntypedArray>) -> PyResult<Bound<'py, PyUntypedArray>> {
    let single = is_float_dtype::<f32>(&array);
    if (single || is_float_dtype::<f64>(&array)) && is_aligned(&array) {
        return Ok(array);
    }
    let py = array.py();
    let target = match array.dtype().itemsize() {
        8 => numpy::dtype::<f64>(py),
        _ => numpy::dtype::<f32>(py),
    };
    let copy = array.call_method1("astype", (target,))?;
    Ok(copy
        .cast_into::<PyUntypedArray>()
        .expect("astype returns an ndarray"))
}

/// Shape equality without a call to `memcmp` (which `==` on slices makes): shapes are a
/// few numbers, compared several times per array and call.
fn same_shape(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Gradients may be float16, float32 or float64 (anything else is refused, not cast).
fn check_gradient_dtype(array: &Bound<'_, PyUntypedArray>, key: &Key<'_>) -> PyResult<()> {
    if is_float_dtype::<f64>(array) || is_float_dtype::<f32>(array) {
        return Ok(());
    }
    let dtype = array.dtype();
    if dtype.kind() == b'f' && matches!(dtype.itemsize(), 2 | 4 | 8) {
        return Ok(());
    }
    Err(key.error(|name| {
        format!(
            "gradient '{name}' has unsupported dtype {} (expected float16, float32 or float64)",
            dtype_name(array)
        )
    }))
}

/// Looks up and checks the gradient of one parameter (the caller's array, not yet read).
fn checked_grad<'py>(
    grads: &Bound<'py, PyDict>,
    key: &Key<'py>,
    param_shape: &[usize],
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let Some(object) = grads.get_item(&key.0)? else {
        return Err(key.error(|name| format!("missing gradient for parameter '{name}'")));
    };
    let array = as_array(object, "gradient", || key.text())?;
    check_gradient_dtype(&array, key)?;
    if !same_shape(array.shape(), param_shape) {
        return Err(key.error(|name| {
            format!(
                "gradient '{name}' has shape {} but the parameter has shape {}",
                describe_shape(array.shape()),
                describe_shape(param_shape)
            )
        }));
    }
    Ok(array)
}

/// A checked gradient as the kernels read it: in place, or converted into a staged copy.
fn gradient_source<'py, T: Float>(
    array: Bound<'py, PyUntypedArray>,
    order: Order,
) -> PyResult<Source<'py, T>> {
    let array = native_float(array)?;
    if is_float_dtype::<T>(&array) {
        let typed = typed_into::<T>(array).expect("dtype checked");
        return Ok(Source::new(typed, order));
    }
    // float32 <-> float64 is rounded here, in Rust, so an overflow to infinity is reported
    // as a non-finite gradient, not warned about by NumPy.
    let values = if is_float_dtype::<f32>(&array) {
        convert::<f32, T>(&array, order)
    } else {
        convert::<f64, T>(&array, order)
    };
    Ok(Source::Staged(values))
}

fn convert<S: Float, T: Real>(array: &Bound<'_, PyUntypedArray>, order: Order) -> Box<[T]> {
    let typed = typed::<S>(array).expect("dtype checked");
    order.gather(read_view(typed), |x: S| T::from_f64(x.to_f64()))
}

/// A state array allocated by the current call.
type NewArray<'py, T> = Bound<'py, PyArrayDyn<T>>;

/// Looks up or creates, and checks, one state array of one parameter.
fn borrow_state<'py, T: Float>(
    spec: &StateSpec<'_, 'py>,
    key: &Key<'py>,
    param_shape: &[usize],
    order: Order,
    user: &CallClaims,
) -> PyResult<(Target<'py, T>, Option<NewArray<'py, T>>)> {
    let py = spec.dict.py();
    // The state-dict key, for messages: only formatted on an error path.
    let state_key = || format!("{}{}", spec.prefix, key.text());
    let existing = match spec.dict.get_item(&key.0)? {
        Some(object) => {
            let array = as_array(object, "state", state_key)?;
            let fits = is_float_dtype::<T>(&array) && same_shape(array.shape(), param_shape);
            match (fits, spec.policy) {
                (true, _) => Some(array),
                (false, Policy::Scratch) => None,
                (false, _) => {
                    let name = key.text();
                    let key = state_key();
                    return Err(optimizer_error(
                        &key,
                        format!(
                            "state '{key}' has dtype {} and shape {} but parameter '{name}' has \
                             dtype {} and shape {}",
                            dtype_name(&array),
                            describe_shape(array.shape()),
                            numpy::dtype::<T>(py),
                            describe_shape(param_shape)
                        ),
                    ));
                }
            }
        }
        None if spec.policy == Policy::Required => {
            let key = state_key();
            return Err(optimizer_error(&key, format!("state '{key}' is missing")));
        }
        None => None,
    };
    match existing {
        Some(array) => {
            let (start, end) = extent::<T>(&array);
            if !has_flags(&array, NPY_ARRAY_BEHAVED) || user.touches(start, end) {
                let key = state_key();
                return Err(optimizer_error(
                    &key,
                    format!(
                        "state '{key}' is not the optimizer's own writable, aligned array \
                         (it shares memory with an array of this call)"
                    ),
                ));
            }
            let typed = typed_into::<T>(array).expect("dtype checked");
            Ok((Target::new(Access(typed), order), None))
        }
        None => {
            let created = PyArrayDyn::<T>::zeros(py, param_shape, order == Order::F);
            let target = Target::new(Access(created.clone()), order);
            Ok((target, Some(created)))
        }
    }
}

/// What building every entry of a call shares.
struct EntryBuilder<'a, 'py> {
    states: &'a [StateSpec<'a, 'py>],
    user: &'a CallClaims,
    created: Vec<Created<'py>>,
}

impl<'py> EntryBuilder<'_, 'py> {
    /// Appends parameter `item`'s entry: the parameter laid out for the kernels, its
    /// gradient, its states.
    fn build<T: Float>(
        &mut self,
        entries: &mut Vec<Entry<'py, T>>,
        item: usize,
        key: &Key<'py>,
        param: Bound<'py, PyUntypedArray>,
        grad: Option<Bound<'py, PyUntypedArray>>,
    ) -> PyResult<()> {
        let order = Order::of(&param);
        let grad = grad.map(|g| gradient_source(g, order)).transpose()?;
        let typed = typed_into::<T>(param).expect("dtype checked");
        entries.push(Entry {
            param: Target::new(Access(typed), order),
            grad,
            states: Slots::new(),
        });
        let entry = entries.last_mut().expect("just pushed");
        for (index, spec) in self.states.iter().enumerate() {
            let shape = entry.param.shape();
            let (target, new) = borrow_state::<T>(spec, key, shape, order, self.user)?;
            entry.states.push(target);
            if let Some(array) = new {
                self.created.push((item, index, array.into_any()));
            }
        }
        Ok(())
    }
}

/// A parameter after its checks: a writable, aligned float32 or float64 array.
fn checked_param<'py>(
    key: &Key<'py>,
    object: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let array = as_array(object, "parameter", || key.text())?;
    if !is_aligned(&array) {
        return Err(key.error(|name| {
            format!("parameter '{name}' is not aligned in memory (copy it to update it)")
        }));
    }
    if !(is_float_dtype::<f32>(&array) || is_float_dtype::<f64>(&array)) {
        return Err(key.error(|name| {
            format!(
                "parameter '{name}' has dtype {} (expected float32 or float64)",
                dtype_name(&array)
            )
        }));
    }
    if !has_flags(&array, numpy::npyffi::NPY_ARRAY_WRITEABLE) {
        return Err(key.error(|name| format!("parameter '{name}' is read-only (not writeable)")));
    }
    Ok(array)
}

/// Checks that the call's arrays do not alias each other and registers their claims
/// against the other calls in flight. Items are numbered parameters first, then gradients,
/// each in name order.
fn claim_memory(
    names: &[Key<'_>],
    claims: Vec<Claim>,
) -> PyResult<(Arc<CallClaims>, Registration)> {
    let blame = |item: usize| {
        let what = if item < names.len() {
            "parameter"
        } else {
            "gradient"
        };
        shared_memory_error(what, &names[item % names.len()].text())
    };
    let claims = Arc::new(CallClaims::new(claims));
    if let Some(item) = claims.first_conflict() {
        return Err(blame(item));
    }
    // The call keeps them too, to check the optimizer's state arrays against.
    let registration = claims::register(Arc::clone(&claims)).map_err(blame)?;
    Ok((claims, registration))
}

/// Stage 1: validates everything a call touches and claims its memory, without writing
/// anything.
fn prepare<'py>(
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    grads: Option<&Bound<'py, PyDict>>,
    states: &[StateSpec<'_, 'py>],
) -> PyResult<Prepared<'py>> {
    let mut names = Vec::with_capacity(params.len());
    let mut claims = Vec::with_capacity(2 * params.len());
    let mut param_arrays = Vec::with_capacity(params.len());
    for (item, (key, object)) in sorted_entries(params, order)?.into_iter().enumerate() {
        let array = checked_param(&key, object)?;
        claims.push(claim_of(&array, true, item));
        param_arrays.push(array);
        names.push(key);
    }
    let n = names.len();
    let mut grad_arrays = Vec::with_capacity(if grads.is_some() { n } else { 0 });
    if let Some(grads) = grads {
        for (item, (key, param)) in names.iter().zip(&param_arrays).enumerate() {
            let array = checked_grad(grads, key, param.shape())?;
            claims.push(claim_of(&array, false, n + item));
            grad_arrays.push(array);
        }
    }
    // Nothing of the caller's is read before its memory is claimed.
    let (user, registration) = claim_memory(&names, claims)?;
    let mut grad_arrays = grad_arrays.into_iter();
    let n_single = param_arrays
        .iter()
        .filter(|p| is_float_dtype::<f32>(p))
        .count();
    let mut singles = Vec::with_capacity(n_single);
    let mut doubles = Vec::with_capacity(n - n_single);
    let mut is_single = Vec::with_capacity(n);
    let mut builder = EntryBuilder {
        states,
        user: &user,
        created: Vec::new(),
    };
    for (item, (key, param)) in names.iter().zip(param_arrays).enumerate() {
        let grad = grads.and_then(|_| grad_arrays.next());
        let single = is_float_dtype::<f32>(&param);
        if single {
            builder.build(&mut singles, item, key, param, grad)?;
        } else {
            builder.build(&mut doubles, item, key, param, grad)?;
        }
        is_single.push(single);
    }
    let created = builder.created;
    Ok(Prepared {
        names,
        singles,
        doubles,
        is_single,
        created,
        _registration: registration,
    })
}

impl<'py> Prepared<'py> {
    /// Stage 3: writes staged copies back and publishes the state arrays this call created.
    fn commit(mut self, states: &[StateSpec<'_, 'py>]) -> PyResult<()> {
        fn write_back<T: Element + Copy>(entry: &mut Entry<'_, T>) {
            entry.param.write_back();
            entry.states.iter_mut().for_each(Target::write_back);
        }
        self.singles.iter_mut().for_each(write_back);
        self.doubles.iter_mut().for_each(write_back);
        for (item, state, array) in self.created.drain(..) {
            states[state].dict.set_item(&self.names[item].0, array)?;
        }
        Ok(())
    }

    fn norm_error(&self, error: NormError) -> PyErr {
        match error {
            NormError::NonFiniteGradient(index) => {
                let name = self.names[index].text();
                non_finite_error(&name, format!("gradient '{name}' contains NaN or infinity"))
            }
            NormError::NonFiniteParameter(index) => self.names[index]
                .error(|name| format!("parameter '{name}' contains NaN or infinity")),
        }
    }
}

/// The lanes of one entry for the kernels: parameter, gradient (if the call has one), states.
fn entry_lanes<'a, T: Element + Copy>(
    entry: &'a mut Entry<'_, T>,
) -> (&'a mut [T], Option<&'a [T]>, Slots<&'a mut [T]>) {
    let Entry {
        param,
        grad,
        states,
        ..
    } = entry;
    let grad = grad.as_ref().map(Source::slice);
    let mut slices = Slots::new();
    states
        .iter_mut()
        .for_each(|state| slices.push(state.slice()));
    (param.slice(), grad, slices)
}

/// Kernel lanes that carry a gradient: what the read-only pass before the writes needs.
trait WithGradient<T> {
    fn gradient(&self) -> &[T];
    /// GSAM's `g0`, when the update mixes it in.
    fn reference(&self) -> Option<&[T]> {
        None
    }
}

impl<T> WithGradient<T> for kernels::SgdLanes<'_, T> {
    fn gradient(&self) -> &[T] {
        self.1
    }
    fn reference(&self) -> Option<&[T]> {
        self.4
    }
}

impl<T> WithGradient<T> for kernels::AdamLanes<'_, T> {
    fn gradient(&self) -> &[T] {
        self.1
    }
    fn reference(&self) -> Option<&[T]> {
        self.5
    }
}

impl<T> WithGradient<T> for kernels::MixLanes<'_, T> {
    fn gradient(&self) -> &[T] {
        self.1
    }
    fn reference(&self) -> Option<&[T]> {
        Some(self.2)
    }
}

/// The gradients of the kernel lanes, reborrowed for the read-only pass.
fn gradient_items<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
) -> Vec<NormItem<'_>> {
    items
        .iter()
        .map(|item| match item {
            ByDtype::Single(l) => ByDtype::Single((l.gradient(), None)),
            ByDtype::Double(l) => ByDtype::Double((l.gradient(), None)),
        })
        .collect()
}

/// GSAM's mixing inputs: alpha and `‖g0‖` (known from the first step).
#[derive(Clone, Copy)]
struct GsamMix {
    alpha: f64,
    grad0_norm: f64,
}

/// GSAM's mix for these lanes: `‖g1‖` (which also checks g1 finite) and the cosine
/// between g0 and g1 give `a`, `b` and the norm of the mixed gradient.
fn plan_mix<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
    gsam: GsamMix,
) -> Result<(Mix, f64), NormError> {
    let n0 = gsam.grad0_norm;
    let n1 = norm::global_norm_parts(&gradient_items(items), 0.0)?;
    let cos = if n0 > 0.0 && n1.mantissa > 0.0 {
        let pairs: Vec<DotItem<'_>> = items
            .iter()
            .map(|item| match item {
                ByDtype::Single(l) => ByDtype::Single((l.gradient(), reference_of(l))),
                ByDtype::Double(l) => ByDtype::Double((l.gradient(), reference_of(l))),
            })
            .collect();
        norm::normalised_dot(&pairs, n1, n0)
    } else {
        0.0
    };
    let mix = kernels::gsam_mix(gsam.alpha, n0, n1, cos);
    Ok((mix, kernels::mixed_norm(gsam.alpha, n0, n1.value(), cos)))
}

fn reference_of<T>(lanes: &impl WithGradient<T>) -> &[T] {
    lanes.reference().expect("GSAM lanes carry g0")
}

/// Everything that must hold before a base step writes: finite gradients, and the clipping
/// and GSAM mix resolved to per-element constants. Reads the gradients once (twice with
/// GSAM); the global norm is only computed when norm clipping or GSAM needs it.
fn plan_update<S: WithGradient<f32>, D: WithGradient<f64>>(
    items: &[ByDtype<S, D>],
    clip_value: Option<f64>,
    clip_norm: Option<f64>,
    gsam: Option<GsamMix>,
) -> Result<(Clip, Mix), NormError> {
    let (mix, norm) = match gsam {
        Some(gsam) => plan_mix(items, gsam)?,
        None if clip_value.is_none() && clip_norm.is_some() => {
            (Mix::PLAIN, norm::global_norm(&gradient_items(items), 0.0)?)
        }
        None => {
            norm::check_finite(&gradient_items(items))?;
            (Mix::PLAIN, f64::NAN)
        }
    };
    let clip = match (clip_value, clip_norm) {
        (Some(c), _) => Clip::value(c),
        (None, Some(c)) if norm > c => Clip::scale(c / norm),
        _ => Clip::OFF,
    };
    Ok((clip, mix))
}

/// Builds one kernel's lanes for every entry, in name order.
fn lanes_of<'a, S, D>(
    prepared: &'a mut Prepared<'_>,
    single: impl Fn(&'a mut Entry<'_, f32>) -> S,
    double: impl Fn(&'a mut Entry<'_, f64>) -> D,
) -> Vec<ByDtype<S, D>> {
    let mut singles = prepared.singles.iter_mut();
    let mut doubles = prepared.doubles.iter_mut();
    let one_of_each = "an entry per name";
    prepared
        .is_single
        .iter()
        .map(|&is_single| match is_single {
            true => ByDtype::Single(single(singles.next().expect(one_of_each))),
            false => ByDtype::Double(double(doubles.next().expect(one_of_each))),
        })
        .collect()
}

/// Splits an entry's state slices into the fixed number a kernel expects.
fn take_states<const N: usize, T>(mut states: Slots<&mut [T]>) -> [&mut [T]; N] {
    assert_eq!(states.len, N, "one slice per state spec");
    std::array::from_fn(|i| states.items[i].take().expect("counted above"))
}

/// Where a base step starts from when SAM drives it: the saved values (the restore fused
/// into the update) and, for GSAM, the kept `g0` with its mixing inputs.
struct Restart<'a, 'py> {
    saved: Option<&'a Bound<'py, PyDict>>,
    gsam: Option<(&'a Bound<'py, PyDict>, GsamMix)>,
}

impl<'a, 'py> Restart<'a, 'py> {
    fn new(
        saved: Option<&'a Bound<'py, PyDict>>,
        gsam: Option<&'a (Bound<'py, PyDict>, f64, f64)>,
    ) -> Self {
        let gsam = gsam.map(|(dict, alpha, grad0_norm)| {
            let mix = GsamMix {
                alpha: *alpha,
                grad0_norm: *grad0_norm,
            };
            (dict, mix)
        });
        Restart { saved, gsam }
    }

    /// The optimizer's own state specs followed by the restart's.
    fn specs(&self, mut own: Vec<StateSpec<'a, 'py>>) -> Vec<StateSpec<'a, 'py>> {
        if let Some(saved) = self.saved {
            own.push(StateSpec {
                dict: saved,
                prefix: "saved_",
                policy: Policy::Required,
            });
        }
        if let Some((grad0, _)) = self.gsam {
            own.push(StateSpec {
                dict: grad0,
                prefix: "grad0_",
                policy: Policy::Required,
            });
        }
        own
    }

    fn flags(&self) -> (bool, bool) {
        (self.saved.is_some(), self.gsam.is_some())
    }
}

/// An entry's own state slices, then its saved values and its g0 when the step has them.
type RestartSlices<'a, T> = (Slots<&'a mut [T]>, Option<&'a [T]>, Option<&'a [T]>);

/// Takes the restart's slices (saved, g0) off the end of an entry's state slices.
fn split_restart<T>(
    mut states: Slots<&mut [T]>,
    (has_saved, has_grad0): (bool, bool),
) -> RestartSlices<'_, T> {
    let grad0 = if has_grad0 {
        states.pop().map(|s| &*s)
    } else {
        None
    };
    let saved = if has_saved {
        states.pop().map(|s| &*s)
    } else {
        None
    };
    (states, saved, grad0)
}

#[pyfunction]
#[pyo3(signature = (params, order, grads, velocity, saved, gsam, lr, momentum, clip_value, clip_norm))]
#[allow(clippy::too_many_arguments)]
fn sgd_step<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    grads: &Bound<'py, PyDict>,
    velocity: &Bound<'py, PyDict>,
    saved: Option<&Bound<'py, PyDict>>,
    gsam: Option<(Bound<'py, PyDict>, f64, f64)>,
    lr: f64,
    momentum: f64,
    clip_value: Option<f64>,
    clip_norm: Option<f64>,
) -> PyResult<()> {
    let restart = Restart::new(saved, gsam.as_ref());
    let own = vec![StateSpec {
        dict: velocity,
        prefix: "velocity_",
        policy: Policy::Lazy,
    }];
    let states = restart.specs(own);
    let mut prepared = prepare(params, order, Some(grads), &states)?;
    let flags = restart.flags();
    let items = lanes_of(
        &mut prepared,
        |e| sgd_lanes(e, flags),
        |e| sgd_lanes(e, flags),
    );
    let gsam = restart.gsam.map(|(_, mix)| mix);
    let outcome = py.detach(move || -> Result<(), NormError> {
        let (clip, mix) = plan_update(&items, clip_value, clip_norm, gsam)?;
        let step = kernels::SgdStep {
            lr,
            momentum,
            clip,
            mix,
        };
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::sgd(lanes, &step),
            ByDtype::Double(lanes) => kernels::sgd(lanes, &step),
        });
        Ok(())
    });
    outcome.map_err(|error| prepared.norm_error(error))?;
    prepared.commit(&states)
}

fn sgd_lanes<'a, T: Element + Real>(
    entry: &'a mut Entry<'_, T>,
    flags: (bool, bool),
) -> kernels::SgdLanes<'a, T> {
    let (param, grad, states) = entry_lanes(entry);
    let (own, saved, grad0) = split_restart(states, flags);
    let [velocity] = take_states(own);
    (
        param,
        grad.expect("the call has gradients"),
        velocity,
        saved,
        grad0,
    )
}

#[pyfunction]
#[pyo3(signature = (params, order, grads, m, v, saved, gsam, lr_t, beta1, beta2, epsilon, decay, clip_value, clip_norm))]
#[allow(clippy::too_many_arguments)]
fn adam_step<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    grads: &Bound<'py, PyDict>,
    m: &Bound<'py, PyDict>,
    v: &Bound<'py, PyDict>,
    saved: Option<&Bound<'py, PyDict>>,
    gsam: Option<(Bound<'py, PyDict>, f64, f64)>,
    lr_t: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    decay: f64,
    clip_value: Option<f64>,
    clip_norm: Option<f64>,
) -> PyResult<()> {
    let restart = Restart::new(saved, gsam.as_ref());
    let own = vec![
        StateSpec {
            dict: m,
            prefix: "m_",
            policy: Policy::Lazy,
        },
        StateSpec {
            dict: v,
            prefix: "v_",
            policy: Policy::Lazy,
        },
    ];
    let states = restart.specs(own);
    let mut prepared = prepare(params, order, Some(grads), &states)?;
    let flags = restart.flags();
    let items = lanes_of(
        &mut prepared,
        |e| adam_lanes(e, flags),
        |e| adam_lanes(e, flags),
    );
    let gsam = restart.gsam.map(|(_, mix)| mix);
    let outcome = py.detach(move || -> Result<(), NormError> {
        let (clip, mix) = plan_update(&items, clip_value, clip_norm, gsam)?;
        let step = kernels::AdamStep {
            lr_t,
            beta1,
            beta2,
            epsilon,
            decay,
            clip,
            mix,
        };
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::adam(lanes, &step),
            ByDtype::Double(lanes) => kernels::adam(lanes, &step),
        });
        Ok(())
    });
    outcome.map_err(|error| prepared.norm_error(error))?;
    prepared.commit(&states)
}

fn adam_lanes<'a, T: Element + Real>(
    entry: &'a mut Entry<'_, T>,
    flags: (bool, bool),
) -> kernels::AdamLanes<'a, T> {
    let (param, grad, states) = entry_lanes(entry);
    let (own, saved, grad0) = split_restart(states, flags);
    let [m, v] = take_states(own);
    (
        param,
        grad.expect("the call has gradients"),
        m,
        v,
        saved,
        grad0,
    )
}

/// GSAM's mixed gradient `g1 − α·g0⊥` written into scratch buffers `out`, for a base
/// optimizer written in Python (samopt's own fuse the mix into their update).
#[pyfunction]
#[pyo3(signature = (params, order, grads, grad0, out, alpha, grad0_norm))]
#[allow(clippy::too_many_arguments)]
fn gsam_direction<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    grads: &Bound<'py, PyDict>,
    grad0: &Bound<'py, PyDict>,
    out: &Bound<'py, PyDict>,
    alpha: f64,
    grad0_norm: f64,
) -> PyResult<()> {
    let states = [
        StateSpec {
            dict: out,
            prefix: "direction_",
            policy: Policy::Scratch,
        },
        StateSpec {
            dict: grad0,
            prefix: "grad0_",
            policy: Policy::Required,
        },
    ];
    let mut prepared = prepare(params, order, Some(grads), &states)?;
    let items = lanes_of(&mut prepared, mix_lanes, mix_lanes);
    let gsam = GsamMix { alpha, grad0_norm };
    let outcome = py.detach(move || -> Result<(), NormError> {
        let (mix, _) = plan_mix(&items, gsam)?;
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::mix_into(lanes, mix),
            ByDtype::Double(lanes) => kernels::mix_into(lanes, mix),
        });
        Ok(())
    });
    outcome.map_err(|error| prepared.norm_error(error))?;
    prepared.commit(&states)
}

fn mix_lanes<'a, T: Element + Real>(entry: &'a mut Entry<'_, T>) -> kernels::MixLanes<'a, T> {
    let (_, grad, states) = entry_lanes(entry);
    let [out, grad0] = take_states(states);
    (out, grad.expect("the call has gradients"), grad0)
}

/// SAM's first phase: moves the parameters by the ascent `ρ·g/(n + eps)` (adaptive:
/// `ρ·T²⊙g/(n + eps)`), saving their values, and with `grad0` keeping the gradients
/// (GSAM). Returns the norm `n`; when it is zero nothing is written.
#[pyfunction]
#[pyo3(signature = (params, order, grads, saved, grad0, rho, eps, adaptive, eta))]
#[allow(clippy::too_many_arguments)]
fn sam_perturb<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    grads: &Bound<'py, PyDict>,
    saved: &Bound<'py, PyDict>,
    grad0: Option<&Bound<'py, PyDict>>,
    rho: f64,
    eps: f64,
    adaptive: bool,
    eta: f64,
) -> PyResult<f64> {
    let mut states = vec![StateSpec {
        dict: saved,
        prefix: "saved_",
        policy: Policy::Scratch,
    }];
    if let Some(grad0) = grad0 {
        states.push(StateSpec {
            dict: grad0,
            prefix: "grad0_",
            policy: Policy::Scratch,
        });
    }
    let mut prepared = prepare(params, order, Some(grads), &states)?;
    let items = lanes_of(&mut prepared, perturb_lanes, perturb_lanes);
    let outcome = py.detach(move || -> Result<f64, NormError> {
        let weighted: Vec<NormItem<'_>> = items
            .iter()
            .map(|item| match item {
                ByDtype::Single(l) => ByDtype::Single((l.1, adaptive.then_some(&*l.0))),
                ByDtype::Double(l) => ByDtype::Double((l.1, adaptive.then_some(&*l.0))),
            })
            .collect();
        let parts = norm::global_norm_parts(&weighted, eta)?;
        let norm = parts.value();
        if parts.mantissa == 0.0 {
            return Ok(0.0);
        }
        let scale = if eps > 0.0 {
            WideFactor::ratio(rho, norm + eps)
        } else {
            WideFactor::ratio_scaled(rho, parts.mantissa, parts.exponent)
        };
        let ascent = if adaptive {
            Ascent::Adaptive { scale, eta }
        } else {
            Ascent::Plain { scale }
        };
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::perturb(lanes, &ascent),
            ByDtype::Double(lanes) => kernels::perturb(lanes, &ascent),
        });
        Ok(norm)
    });
    let norm = outcome.map_err(|error| prepared.norm_error(error))?;
    if norm > 0.0 {
        prepared.commit(&states)?;
    }
    Ok(norm)
}

fn perturb_lanes<'a, T: Element + Real>(
    entry: &'a mut Entry<'_, T>,
) -> kernels::PerturbLanes<'a, T> {
    let (param, grad, mut states) = entry_lanes(entry);
    let kept = (states.len == 2).then(|| states.pop()).flatten();
    let [saved] = take_states(states);
    (param, grad.expect("the call has gradients"), saved, kept)
}

/// Puts every parameter back to its saved value, bit for bit.
#[pyfunction]
#[pyo3(signature = (params, order, saved))]
fn restore<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyDict>,
    order: Option<&Bound<'py, NameOrder>>,
    saved: &Bound<'py, PyDict>,
) -> PyResult<()> {
    let states = [StateSpec {
        dict: saved,
        prefix: "saved_",
        policy: Policy::Required,
    }];
    let mut prepared = prepare(params, order, None, &states)?;
    let items = lanes_of(&mut prepared, restore_lanes, restore_lanes);
    py.detach(move || {
        for_each(items, |piece| match piece {
            ByDtype::Single(lanes) => kernels::restore(lanes),
            ByDtype::Double(lanes) => kernels::restore(lanes),
        });
    });
    prepared.commit(&states)
}

fn restore_lanes<'a, T: Element + Real>(
    entry: &'a mut Entry<'_, T>,
) -> kernels::RestoreLanes<'a, T> {
    let (param, _, states) = entry_lanes(entry);
    let [saved] = take_states(states);
    (param, saved)
}

/// A read-only gradient of any real float dtype, as f32 or f64 lanes for a norm.
enum NormSource<'py> {
    Single(Source<'py, f32>),
    Double(Source<'py, f64>),
}

fn norm_source(array: Bound<'_, PyUntypedArray>) -> PyResult<NormSource<'_>> {
    let array = native_float(array)?;
    // Any contiguous layout will do for a norm; anything else is gathered in C order.
    let order = Order::of(&array);
    Ok(if is_float_dtype::<f32>(&array) {
        NormSource::Single(Source::new(
            typed_into(array).expect("dtype checked"),
            order,
        ))
    } else {
        NormSource::Double(Source::new(
            typed_into(array).expect("dtype checked"),
            order,
        ))
    })
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
        let array = as_array(object, "gradient", || key.text())?;
        check_gradient_dtype(&array, &key)?;
        claims.push(claim_of(&array, false, item));
        arrays.push(array);
        names.push(key);
    }
    let _registration = claims::register(Arc::new(CallClaims::new(claims)))
        .map_err(|item| shared_memory_error("gradient", &names[item].text()))?;
    let sources = arrays
        .into_iter()
        .map(norm_source)
        .collect::<PyResult<Vec<_>>>()?;
    let items: Vec<NormItem<'_>> = sources
        .iter()
        .map(|source| match source {
            NormSource::Single(s) => ByDtype::Single((s.slice(), None)),
            NormSource::Double(s) => ByDtype::Double((s.slice(), None)),
        })
        .collect();
    Ok(py.detach(|| match norm::global_norm(&items, 0.0) {
        Ok(norm) => norm,
        Err(_) if norm::any_nan(&items) => f64::NAN,
        Err(_) => f64::INFINITY,
    }))
}

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(sgd_step, module)?)?;
    module.add_function(wrap_pyfunction!(adam_step, module)?)?;
    module.add_function(wrap_pyfunction!(sam_perturb, module)?)?;
    module.add_function(wrap_pyfunction!(restore, module)?)?;
    module.add_function(wrap_pyfunction!(gsam_direction, module)?)?;
    module.add_function(wrap_pyfunction!(gradient_norm, module)?)?;
    module.add_class::<NameOrder>()?;
    Ok(())
}
