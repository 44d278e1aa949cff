## lme4's InstEval optimum polished by Newton on lme4's own deviance function.
##
## bobyqa (insteval_tight.R, rhoend 1e-12) stops where the deviance (about
## 2.4e5) no longer changes in its last digits; along the flat
## dept:service direction that leaves the variances a few 1e-6 from the optimum.
## Here the same profiled deviance (lme4's mkLmerDevfun) is minimised further by
## Newton steps, starting from the tight bobyqa fit.  The gradient, whose zero
## is the result, is the five-point central difference with step 1e-3 in theta
## (truncation O(h^4); the deviance's round-off of about 1e-9 gives a gradient
## error of about 1e-6 against curvatures of 1e3-1e4, i.e. theta to about
## 1e-9); a three-point difference was biased by its O(h^2) truncation along
## the curved dept:service direction (1e-6 in that variance).  The Hessian
## (three-point, step 1e-3) only sets the step; Newton stops when the step is
## below 1e-8 or after 8 iterations.  The result is written
## as lme4's merMod built at the polished theta (mkMerMod).  Run from the
## repository root:
##   Rscript tests/reference/multicomp/insteval_polish.R
## Writes insteval_polish_REML.csv and insteval_polish_ML.csv (quantity, name,
## value; 17 significant digits), with the deviance at bobyqa's theta and at the
## polished one.
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "..", "common.R"))   # fmt17, tight_ctrl

data("InstEval", package = "lme4")
form <- y ~ service + (1 | s) + (1 | d) + (1 | dept:service)

newton_polish <- function(f, x, h = 1e-3, maxit = 8, tol = 1e-8) {
  k <- length(x)
  E <- diag(h, k)
  for (it in seq_len(maxit)) {
    f0 <- f(x)
    fp <- sapply(seq_len(k), function(i) f(x + E[, i]))
    fm <- sapply(seq_len(k), function(i) f(x - E[, i]))
    g <- sapply(seq_len(k), function(i)
      (-f(x + 2 * E[, i]) + 8 * fp[i] - 8 * fm[i] + f(x - 2 * E[, i])) / (12 * h))
    H <- diag((fp - 2 * f0 + fm) / h^2, k)
    for (i in seq_len(k)) for (j in seq_len(k)) if (j > i) {
      H[i, j] <- H[j, i] <- (f(x + E[, i] + E[, j]) - f(x + E[, i] - E[, j])
                             - f(x - E[, i] + E[, j]) + f(x - E[, i] - E[, j])) / (4 * h^2)
    }
    step <- -solve(H, g)
    x <- x + step
    cat(sprintf("  iteration %d: max |step| %.3g, max |gradient| %.3g\n", it, max(abs(step)),
                max(abs(g))))
    if (max(abs(step)) < tol) break
  }
  x
}

for (reml in c(TRUE, FALSE)) {
  meth <- if (reml) "REML" else "ML"
  tight <- lmer(form, data = InstEval, REML = reml, control = tight_ctrl())
  lf <- lFormula(form, data = InstEval, REML = reml)
  devfun <- do.call(mkLmerDevfun, lf)
  th0 <- getME(tight, "theta")
  stopifnot(all(th0 > 1e-3))                       # an interior optimum: Newton applies
  th <- newton_polish(devfun, th0)
  dev0 <- devfun(th0)
  dev1 <- devfun(th)
  opt <- list(par = th, fval = dev1, conv = 0, message = "Newton polish of bobyqa's optimum")
  fit <- mkMerMod(environment(devfun), opt, lf$reTrms, fr = lf$fr)
  vc <- as.data.frame(VarCorr(fit))
  se <- sqrt(diag(as.matrix(vcov(fit))))
  num <- function(q, n, v) data.frame(quantity = q, name = n, value = fmt17(v))
  out <- rbind(
    num("loglik", "", as.numeric(logLik(fit))),
    num("variance", vc$grp, vc$vcov),
    num("theta", names(th), unname(th)),
    num("fixef", names(fixef(fit)), unname(fixef(fit))),
    num("se", names(se), unname(se)),
    num("deviance_bobyqa", "", dev0),
    num("deviance_polished", "", dev1))
  write.csv(out, file.path(here, sprintf("insteval_polish_%s.csv", meth)), row.names = FALSE,
            quote = FALSE)
  cat(meth, "deviance bobyqa", fmt17(dev0), "polished", fmt17(dev1), "\n")
}
cat("R", R.version.string, "lme4", as.character(packageVersion("lme4")), "\n")
