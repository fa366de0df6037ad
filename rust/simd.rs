//! Kernels compiled for the widest vectors the CPU has. Each kernel body is compiled three
//! times — portable, with AVX2 and with AVX-512 enabled — and `widest!` picks one at run
//! time (wheels target baseline x86-64). Only the vector width changes, never the
//! operations (Rust never fuses a multiply and an add), so results are bitwise the same
//! on every machine.

/// Calls `$body::avx512`, `$body::avx2` or `$body::portable`, whichever the CPU runs.
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

/// Declares a kernel body once (generics in square brackets, inferred from the arguments
/// at the call) and compiles it three times in a module of that name.
macro_rules! kernel_body {
    ($name:ident[$($generics:tt)*]($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            // Index loops over slices cut to one length vectorise without bounds checks.
            #[allow(clippy::needless_range_loop)]
            #[inline(always)]
            fn body<$($generics)*>($($arg: $ty),*) $(-> $ret)? $body

            pub(super) fn portable<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            pub(super) unsafe fn avx2<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl")]
            pub(super) unsafe fn avx512<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
        }
    };
}
