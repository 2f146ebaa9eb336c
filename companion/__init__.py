"""companion: the importable package behind *How Optimality Structures Sparse Dictionaries*.

Conventions: samples are rows of ``X`` (n_samples, n_features); atoms are rows of ``D``
(n_atoms, n_features) with unit norm; codes ``Z`` (n_samples, n_atoms) are nonnegative; the
reconstruction is ``Z @ D``. Every public function accepts torch tensors or numpy arrays and
answers in kind.
"""

from .bounds import huber, huber_bound
from .certificates import CertificateReport, certify
from .coding import ConvergenceWarning, EncodeInfo, encode, nonneg_lasso_value
from .dictionary import DictionaryFit, fit_dictionary
from .losses import joint_loss, sae_loss
from .runtime import generator, glue, perturb_data, pick_device, setup
from .data import SparseSuperposition, sparse_superposition
from .sae import (AmortisationGap, SAETrainResult, VanillaSAE, amortisation_gap,
                  plateau_fall, train_sae)
from .digits import DigitsActivations, digits_activations
from .lm import LMActivations, lm_activations
from .interop import (Checkpoint, CheckpointError, CheckpointWarning, LamMismatchError,
                      SAECertificate, certify_checkpoint, certify_sae, checkpoint_eps, checkpoint_lam, load_sae,
                      open_activations, save_sae)
from .verdict import CertificateStatistics
from .beyond_l1 import (LocalMoves, MatchedL1, PlainStationarity, RefitGap, SparseCheckpoint,
                        SparseSAE, SparseSAECertificate, best_support_codes, certify_sparse_sae,
                        load_sparse_sae, local_moves, matched_lambda, nnls_refit,
                        plain_centroid_stationarity, refit_gap)
from .matching import AtomMatching, cosine_matrix, match_atoms
from .absorption import (AbsorptionReport, ConceptProbe, KSparseProbing, SAEBenchAbsorption,
                         absorption, concept_probe, k_sparse_probing, saebench_absorption)
from .second_order import (AtomHessian, GroupCurvature, atom_hessian, group_curvature,
                           SphereMinimisation, minimize_on_spheres, new_atom_bound, rotate_atom,
                           split_atom, split_rate, value_gradient)
from .hierarchy import (ConceptTree, ParentChildData, PartialAbsorptionPrediction,
                        SplittingPrediction, ansatz_child_cost, ansatz_codes, concept_tree,
                        group_atom, parent_child, predict_partial_absorption,
                        predict_partial_absorption_empirical, predict_splitting)
from .residuals import (AmortisationSplit, AtomMeanResiduals, LinearPredictability,
                        ResidualSplit, amortisation_split, atom_mean_residuals,
                        linear_predictability, split_residuals)
from .dense import DenseDirectionData, dense_direction_data
from .convex import (ConvexFit, ConvexPath, combine_candidates, convex_path, mu_max,
                     normalised_data, pairwise_sums, solve_convex)
from .antipodal import (Antipodality, DenseCosts, DensePair, DensePairReport, PairPrediction,
                        antipodality, centroid_step, dense_direction_costs, find_dense_pairs,
                        firing_rates, pair_centroid_prediction)

__version__ = "0.1.0"

__all__ = [
    "CertificateReport",
    "ConvergenceWarning",
    "EncodeInfo",
    "DictionaryFit",
    "fit_dictionary",
    "certify",
    "encode",
    "nonneg_lasso_value",
    "generator",
    "glue",
    "perturb_data",
    "huber",
    "huber_bound",
    "joint_loss",
    "pick_device",
    "sae_loss",
    "setup",
    "SparseSuperposition",
    "sparse_superposition",
    "AmortisationGap",
    "SAETrainResult",
    "VanillaSAE",
    "amortisation_gap",
    "plateau_fall",
    "train_sae",
    "DigitsActivations",
    "digits_activations",
    "LMActivations",
    "lm_activations",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "LamMismatchError",
    "SAECertificate",
    "certify_checkpoint",
    "certify_sae",
    "open_activations",
    "CertificateStatistics",
    "LocalMoves",
    "MatchedL1",
    "PlainStationarity",
    "RefitGap",
    "SparseCheckpoint",
    "SparseSAE",
    "SparseSAECertificate",
    "best_support_codes",
    "certify_sparse_sae",
    "load_sparse_sae",
    "local_moves",
    "matched_lambda",
    "nnls_refit",
    "plain_centroid_stationarity",
    "refit_gap",
    "checkpoint_eps",
    "checkpoint_lam",
    "load_sae",
    "save_sae",
    "AtomMatching",
    "cosine_matrix",
    "match_atoms",
    "AbsorptionReport",
    "absorption",
    "ConceptProbe",
    "KSparseProbing",
    "SAEBenchAbsorption",
    "concept_probe",
    "k_sparse_probing",
    "saebench_absorption",
    "ConceptTree",
    "ParentChildData",
    "PartialAbsorptionPrediction",
    "SplittingPrediction",
    "ansatz_child_cost",
    "ansatz_codes",
    "concept_tree",
    "group_atom",
    "parent_child",
    "predict_partial_absorption",
    "predict_partial_absorption_empirical",
    "predict_splitting",
    "AtomHessian",
    "GroupCurvature",
    "atom_hessian",
    "group_curvature",
    "new_atom_bound",
    "rotate_atom",
    "split_atom",
    "split_rate",
    "SphereMinimisation",
    "minimize_on_spheres",
    "value_gradient",
    "AmortisationSplit",
    "AtomMeanResiduals",
    "LinearPredictability",
    "ResidualSplit",
    "amortisation_split",
    "atom_mean_residuals",
    "linear_predictability",
    "split_residuals",
    "DenseDirectionData",
    "dense_direction_data",
    "Antipodality",
    "DenseCosts",
    "DensePair",
    "DensePairReport",
    "PairPrediction",
    "antipodality",
    "centroid_step",
    "dense_direction_costs",
    "find_dense_pairs",
    "firing_rates",
    "pair_centroid_prediction",
    "ConvexFit",
    "ConvexPath",
    "combine_candidates",
    "convex_path",
    "mu_max",
    "normalised_data",
    "pairwise_sums",
    "solve_convex",
]
