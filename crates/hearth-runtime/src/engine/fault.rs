//! Fault injection, for tests of the engine's supervision (supervisor.rs) only. With
//! the cargo feature `fault-injection` (off by default; only test builds switch it on,
//! through dev-dependencies) a prompt whose text contains one of the markers below
//! makes the engine fail the way the marker says; without the feature every hook here
//! is an empty inline function and the markers are ordinary text.
//!
//! | marker in the prompt              | what happens                                          |
//! |-----------------------------------|-------------------------------------------------------|
//! | `hearth-fault:step-panic`         | the first step that runs the request panics, once     |
//! | `hearth-fault:step-panic-twice`   | that step and the next one panic (a rebuild)          |
//! | `hearth-fault:step-panic-forever` | every step from then on panics (DEFUNCT)              |
//! | `hearth-fault:rebuild-fails`      | two steps panic and the rebuild fails (DEFUNCT)       |
//! | `hearth-fault:cuda-error`         | the step fails with a CUDA error (sticky: DEFUNCT)    |
//! | `hearth-fault:output-panic`       | the output worker panics on the request's first token |
//! | `hearth-fault:mask-panic`         | the request's token-mask job panics (a mask worker)   |
//!
//! The step's panic comes after the forward pass is committed and before sampling: the
//! hardest point to recover from (the scheduler has advanced, no token was appended).

#[cfg(feature = "fault-injection")]
pub(crate) use enabled::{Faults, OutputFault};

#[cfg(not(feature = "fault-injection"))]
pub(crate) use disabled::{Faults, OutputFault};

#[cfg(not(feature = "fault-injection"))]
mod disabled {
    use std::sync::Arc;

    use crate::error::Result;
    use crate::scheduler::SeqId;
    use crate::tokenizer::TextTokenizer;

    pub(crate) struct Faults;

    impl Faults {
        #[inline]
        pub fn new(_tokenizer: Arc<TextTokenizer>) -> Self {
            Faults
        }
        #[inline]
        pub fn on_submit(&mut self, _id: SeqId, _prompt: &[u32]) -> OutputFault {
            OutputFault
        }
        #[inline]
        pub fn in_step(&mut self, _ids: &[SeqId]) -> Result<()> {
            Ok(())
        }
        #[inline]
        pub fn on_rebuild(&mut self) -> Result<()> {
            Ok(())
        }
        #[inline]
        pub fn mask_panics(&self, _id: SeqId) -> bool {
            false
        }
    }

    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct OutputFault;

    impl OutputFault {
        #[inline]
        pub fn on_token(&self) {}
    }
}

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;

    use crate::error::{Result, RuntimeError};
    use crate::scheduler::SeqId;
    use crate::tokenizer::TextTokenizer;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Mode {
        StepPanic,
        StepPanicTwice,
        StepPanicForever,
        RebuildFails,
        CudaError,
        OutputPanic,
        MaskPanic,
    }

    /// Longest first: each is a prefix of none but `step-panic`'s longer forms.
    const MARKERS: [(&str, Mode); 7] = [
        ("hearth-fault:step-panic-forever", Mode::StepPanicForever),
        ("hearth-fault:step-panic-twice", Mode::StepPanicTwice),
        ("hearth-fault:step-panic", Mode::StepPanic),
        ("hearth-fault:rebuild-fails", Mode::RebuildFails),
        ("hearth-fault:cuda-error", Mode::CudaError),
        ("hearth-fault:output-panic", Mode::OutputPanic),
        ("hearth-fault:mask-panic", Mode::MaskPanic),
    ];

    pub(crate) struct Faults {
        tokenizer: Arc<TextTokenizer>,
        /// Requests whose first step fails.
        marked: HashMap<SeqId, Mode>,
        /// Steps still to panic whatever they run.
        armed: u32,
        forever: bool,
        fail_rebuild: bool,
        /// Requests whose mask jobs panic.
        mask_panic: HashSet<SeqId>,
    }

    impl Faults {
        pub fn new(tokenizer: Arc<TextTokenizer>) -> Self {
            Self {
                tokenizer,
                marked: HashMap::new(),
                armed: 0,
                forever: false,
                fail_rebuild: false,
                mask_panic: HashSet::new(),
            }
        }

        pub fn on_submit(&mut self, id: SeqId, prompt: &[u32]) -> OutputFault {
            let text = self.tokenizer.decode(prompt).unwrap_or_default();
            let mode = MARKERS
                .iter()
                .find(|(m, _)| text.contains(m))
                .map(|&(_, mode)| mode);
            match mode {
                Some(Mode::OutputPanic) => OutputFault { panic: true },
                Some(Mode::MaskPanic) => {
                    self.mask_panic.insert(id);
                    OutputFault::default()
                }
                Some(mode) => {
                    self.marked.insert(id, mode);
                    OutputFault::default()
                }
                None => OutputFault::default(),
            }
        }

        /// Called with the ids a step runs, between its forward pass and its sampling.
        pub fn in_step(&mut self, ids: &[SeqId]) -> Result<()> {
            for id in ids {
                match self.marked.remove(id) {
                    Some(Mode::StepPanicTwice) => self.armed += 2,
                    Some(Mode::StepPanicForever) => self.forever = true,
                    Some(Mode::RebuildFails) => {
                        self.armed += 2;
                        self.fail_rebuild = true;
                    }
                    Some(Mode::CudaError) => {
                        return Err(RuntimeError::Tensor(candle_core::Error::Cuda(
                            "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was \
                             encountered (injected by hearth-fault:cuda-error)"
                                .into(),
                        )))
                    }
                    Some(_) => self.armed += 1,
                    None => {}
                }
            }
            if self.forever {
                panic!("injected fault: hearth-fault:step-panic-forever");
            }
            if self.armed > 0 {
                self.armed -= 1;
                panic!("injected fault: a hearth-fault:step-panic marker");
            }
            Ok(())
        }

        pub fn mask_panics(&self, id: SeqId) -> bool {
            self.mask_panic.contains(&id)
        }

        pub fn on_rebuild(&mut self) -> Result<()> {
            if std::mem::take(&mut self.fail_rebuild) {
                return Err(RuntimeError::Device(
                    "injected fault: hearth-fault:rebuild-fails".into(),
                ));
            }
            Ok(())
        }
    }

    /// Whether the output worker panics on a request's tokens.
    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct OutputFault {
        panic: bool,
    }

    impl OutputFault {
        pub fn on_token(&self) {
            if self.panic {
                panic!("injected fault: hearth-fault:output-panic");
            }
        }
    }
}
