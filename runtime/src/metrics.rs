//! Accuracy over a labelled set: top-1 counts (overall and per class), accuracy, retention.
//!
//! The CLI's `eval` and `demo` and the calibration search ([`crate::calibrate`]) all measure a
//! model by its top-1 class on labelled images, or by its agreement with a reference model (the
//! same count, with the reference's top-1 classes as labels). This is the one place that count
//! and the numbers derived from it are defined; callers run the models and print.
//!
//! May depend on: `std`, [`crate::card`] (its [`argmax`]). No model, no I/O.

use std::vec::Vec;

use crate::card::argmax;

/// Top-1 counts of one class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCount {
    /// Images of this class whose top-1 class is the label.
    pub correct: usize,
    /// Images of this class.
    pub total: usize,
}

/// Top-1 counts over a labelled set: how many images a model puts in their labelled class,
/// overall and per class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Top1 {
    correct: usize,
    total: usize,
    per_class: Vec<ClassCount>,
}

impl Top1 {
    /// No image yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts of `scores` (one row of `classes` class scores per image, as many rows as
    /// `labels`) against `labels`.
    ///
    /// # Panics
    /// When `classes` is 0.
    pub fn of_rows(scores: &[f32], classes: usize, labels: &[i64]) -> Self {
        let mut t = Self::new();
        t.add_rows(scores, classes, labels);
        t
    }

    /// Top-1 agreement with a reference model: the counts of `scores` against the top-1 classes
    /// of `reference` (both one row of `classes` class scores per image) as labels. A reference
    /// row without a top-1 class agrees with nothing.
    ///
    /// # Panics
    /// When `classes` is 0.
    pub fn agreement(reference: &[f32], scores: &[f32], classes: usize) -> Self {
        let mut t = Self::new();
        for (r, q) in reference
            .chunks_exact(classes)
            .zip(scores.chunks_exact(classes))
        {
            t.add(argmax(q), argmax(r).map_or(-1, |c| c as i64));
        }
        t
    }

    /// Counts the images of `scores` (one row of `classes` class scores per image) against
    /// `labels`, row `i` against `labels[i]`.
    ///
    /// # Panics
    /// When `classes` is 0.
    pub fn add_rows(&mut self, scores: &[f32], classes: usize, labels: &[i64]) {
        for (row, &label) in scores.chunks_exact(classes).zip(labels) {
            self.add(argmax(row), label);
        }
    }

    /// Counts one image: the class a model predicts (`None`: no prediction, never correct) and
    /// the image's label. A label that is no class index (negative) only counts overall.
    pub fn add(&mut self, predicted: Option<usize>, label: i64) {
        let hit = predicted.and_then(|p| i64::try_from(p).ok()) == Some(label);
        self.total += 1;
        self.correct += usize::from(hit);
        if let Ok(class) = usize::try_from(label) {
            if self.per_class.len() <= class {
                self.per_class.resize(class + 1, ClassCount::default());
            }
            let c = &mut self.per_class[class];
            c.total += 1;
            c.correct += usize::from(hit);
        }
    }

    /// Images in their labelled class.
    pub fn correct(&self) -> usize {
        self.correct
    }

    /// Images counted.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The counts of each class, by class index (classes past the largest label are absent).
    pub fn per_class(&self) -> &[ClassCount] {
        &self.per_class
    }

    /// Top-1 accuracy: `correct / total` (NaN when no image was counted).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total as f64
    }

    /// Retention against a reference (e.g. the fine-tune a delta stands for): this accuracy over
    /// the reference's, or `None` when the reference's accuracy is not positive.
    pub fn retention(&self, reference: &Self) -> Option<f64> {
        let r = reference.accuracy();
        (r > 0.0).then(|| self.accuracy() / r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accuracy_and_retention() {
        // Three classes; rows: predicts 2, 0, 1, 1 (a tie between 1 and 2 goes to the first).
        let scores = [
            0.1, 0.2, 0.9, //
            3.0, 1.0, 2.0, //
            0.0, 5.0, 1.0, //
            0.0, 4.0, 4.0,
        ];
        let t = Top1::of_rows(&scores, 3, &[2, 1, 1, 2]);
        assert_eq!((t.correct(), t.total()), (2, 4));
        assert_eq!(t.accuracy(), 0.5);
        assert_eq!(
            t.per_class(),
            &[
                ClassCount::default(),
                ClassCount {
                    correct: 1,
                    total: 2
                },
                ClassCount {
                    correct: 1,
                    total: 2
                },
            ]
        );
        let mut reference = Top1::new();
        for label in [0, 1, 2, 3] {
            reference.add(Some(label as usize), label);
        }
        assert_eq!(reference.accuracy(), 1.0);
        assert_eq!(t.retention(&reference), Some(0.5));
        assert_eq!(
            reference.retention(&Top1::of_rows(&scores, 3, &[0, 0, 0, 0])),
            Some(4.0)
        );
        assert_eq!(reference.retention(&Top1::new()), None);
        assert!(Top1::new().accuracy().is_nan());
        // Agreement: the reference's top-1 classes (2, 0, 1, 1) are the labels.
        let other = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let a = Top1::agreement(&scores, &other, 3);
        assert_eq!((a.correct(), a.total()), (2, 4));
    }

    #[test]
    fn no_prediction_and_negative_labels_count_overall_only() {
        let mut t = Top1::new();
        t.add(None, 0);
        t.add(Some(0), -1);
        assert_eq!((t.correct(), t.total()), (0, 2));
        assert_eq!(
            t.per_class(),
            &[ClassCount {
                correct: 0,
                total: 1
            }]
        );
    }
}
