//! Counters: relaxed atomic `u64`s bumped from any thread without a lock, read as a plain
//! snapshot that serialises to JSON (for tools and a control socket) and formats as
//! `name=value` pairs for the log (SIGUSR1, exit). One declaration gives the live set, the
//! snapshot and both formats, so no counter can be counted and never shown, or shown under
//! another name.

/// Declares a live counter set and its snapshot:
/// `counters! { pub struct Live => Snapshot { /// doc
/// name, ... } }`.
macro_rules! counters {
    (
        $(#[$m:meta])*
        $vis:vis struct $live:ident => $snap:ident {
            $( $(#[$fm:meta])* $field:ident ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        $vis struct $live {
            $( $(#[$fm])* pub $field: std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("A snapshot of [`", stringify!($live), "`].")]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        $vis struct $snap {
            $( $(#[$fm])* pub $field: u64, )*
        }

        impl $live {
            /// Every counter's value now (each read on its own: a snapshot taken while requests
            /// run is not one instant).
            pub fn snapshot(&self) -> $snap {
                $snap {
                    $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }

        impl std::fmt::Display for $snap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut sep = "";
                $(
                    write!(f, concat!("{}", stringify!($field), "={}"), sep, self.$field)?;
                    sep = " ";
                )*
                let _ = sep;
                Ok(())
            }
        }
    };
}
pub(crate) use counters;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    counters! {
        struct Live => Snap {
            /// One.
            alpha,
            beta,
        }
    }

    #[test]
    fn snapshot_formats_and_serialises_every_counter_by_name() {
        let live = Live::default();
        live.alpha.fetch_add(3, Ordering::Relaxed);
        live.beta.fetch_add(1, Ordering::Relaxed);
        let s = live.snapshot();
        assert_eq!(s, Snap { alpha: 3, beta: 1 });
        assert_eq!(s.to_string(), "alpha=3 beta=1");
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"alpha":3,"beta":1}"#
        );
    }
}
