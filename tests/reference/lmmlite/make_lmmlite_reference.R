# Reference fits of R/lmmlite on the recla data, for tests/test_kinship.py.
#
# The lmmlite functions are NOT part of this repository.  They come from
#   https://github.com/kbroman/lmmlite, file R/lmm.R at commit
#   184e2888afa985995a8399bcb44a9f67ac0bb081
# (the plain-R eigen_rotation / getMLsoln / calcLL / fitLMM; only use_cpp=FALSE is
# used, so the compiled part of the package is not needed).  Save that file as
# <lmmlite_dir>/lmm.R (any *.R files in the directory are sourced), then run,
# from the repository root:
#
#   Rscript tests/reference/lmmlite/make_lmmlite_reference.R /tmp/lmmlite/R \
#       /work/shared/data/recla tests/reference/lmmlite
#
# Output (next to this script): lmmlite_reml.csv and lmmlite_ml.csv, one row per
# phenotype, with the fit at tol = 1e-10, and lmmlite_default_tol.csv with the
# first phenotype at lmmlite's default tol (1e-4), the setting of the vignette.
#
# lmmlite's plain-R fitLMM accepts check_boundary but does not use it (only the
# C++ version does); its stats::optimize never evaluates h2 = 0 or 1 exactly.  We
# therefore compare with calcLL() at h2 = 0 and h2 = 1 afterwards and keep the best,
# which is what the C++ fitLMM(check_boundary=TRUE) does.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: make_lmmlite_reference.R <lmmlite R dir> [recla dir] [out dir]")
lmmlite_dir <- args[1]
recla_dir <- if (length(args) >= 2) args[2] else "/work/shared/data/recla"
out_dir <- if (length(args) >= 3) args[3] else "tests/reference/lmmlite"

for (f in list.files(lmmlite_dir, pattern = "\\.R$", full.names = TRUE)) source(f)

kinship <- as.matrix(read.csv(file.path(recla_dir, "kinship.csv"), row.names = 1, check.names = FALSE))
pheno <- as.matrix(read.csv(file.path(recla_dir, "pheno.csv"), row.names = 1, check.names = FALSE))
covar <- as.matrix(read.csv(file.path(recla_dir, "covar.csv"), row.names = 1, check.names = FALSE))
stopifnot(identical(rownames(kinship), rownames(pheno)), identical(rownames(covar), rownames(pheno)))

fit_one <- function(j, reml, tol, check_boundary = TRUE) {
    keep <- !is.na(pheno[, j])
    e <- eigen_rotation(kinship[keep, keep], pheno[keep, j], covar[keep, , drop = FALSE],
                        use_cpp = FALSE)
    fit <- fitLMM(e$Kva, e$y, e$X, reml = reml, tol = tol, use_cpp = FALSE)
    boundary <- "interior"
    if (check_boundary) {
        for (h in c(0, 1)) {
            ll <- calcLL(h, e$Kva, e$y, e$X, reml = reml, use_cpp = FALSE)
            if (is.finite(ll) && ll > fit$loglik) {
                s2 <- as.numeric(attr(ll, "sigmasq"))
                fit <- list(beta = attr(ll, "beta"), sigmasq = s2, hsq = h,
                            sigmasq_g = h * s2, sigmasq_e = (1 - h) * s2,
                            loglik = as.numeric(ll))
                boundary <- paste0("h2=", h)
            }
        }
    }
    data.frame(phenotype = colnames(pheno)[j], n = sum(keep),
               beta_intercept = fit$beta[1], beta_sex = fit$beta[2],
               sigmasq = as.numeric(fit$sigmasq), hsq = fit$hsq,
               sigmasq_g = as.numeric(fit$sigmasq_g), sigmasq_e = as.numeric(fit$sigmasq_e),
               loglik = fit$loglik, boundary = boundary)
}

for (reml in c(TRUE, FALSE)) {
    res <- do.call(rbind, lapply(seq_len(ncol(pheno)), fit_one, reml = reml, tol = 1e-10))
    fn <- file.path(out_dir, if (reml) "lmmlite_reml.csv" else "lmmlite_ml.csv")
    write.csv(res, fn, row.names = FALSE)
    cat("wrote", fn, "\n")
}
vig <- fit_one(1, reml = TRUE, tol = 1e-4, check_boundary = FALSE)
write.csv(vig, file.path(out_dir, "lmmlite_default_tol.csv"), row.names = FALSE)
options(digits = 10)
print(vig)
