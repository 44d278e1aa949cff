## Reference fits from lme4 / lmerTest for the designs with several random components
## (data from make_multicomp_data.py). Run from the repository root:
##   python tests/reference/multicomp/make_multicomp_data.py &&
##     Rscript tests/reference/multicomp/multicomp_reference.R
## Every gene is fitted with lmerTest::lmer twice, with bobyqa (rhoend = 1e-12, maxfun = 1e5,
## as tight_ctrl() in ../common.R) and with nloptwrap (NLOPT_LN_BOBYQA; xtol_abs = ftol_abs =
## 1e-12, xtol_rel = 0, maxeval = 1e5); the fit with the higher logLik is kept (bobyqa on ties).
## Output (next to this script), per design in {nested, crossed, three} and method in
## {REML, ML}: <design>_<method>_{loglik,vc,coef,df}.csv, <design>_REML_contrast.csv,
## and <design>_terms.csv, <design>_contrasts.csv, versions.txt.
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("^--file=", "", args[grep("^--file=", args)])))
source(file.path(here, "..", "common.R"))   # write_ref (17 digits), fit_capture

## Tight tolerances, as lme4_reference.R: the default ones (bobyqa rhoend 2e-7; nloptwrap
## xtol_abs = ftol_abs = 1e-8 and nloptr's xtol_rel = 1e-4) leave logLik ~1e-5 short.
ctrl_bobyqa <- tight_ctrl()                 # bobyqa, rhoend 1e-12, maxfun 1e5
ctrl_nlopt <- lmerControl(optimizer = "nloptwrap",   # NLOPT_LN_BOBYQA
                          optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-12, xtol_rel = 0,
                                         maxeval = 1e5),
                          check.conv.singular = "ignore")

designs <- list(
  nested = list(fixed = "0 + celltype + celltype:trt",
                random = "(1 | donor) + (1 | donor:celltype)"),
  crossed = list(fixed = "trt + x",
                 random = "(1 | donor) + (1 | batch)"),
  three = list(fixed = "0 + celltype + celltype:trt",
               random = "(1 | donor) + (1 | donor:celltype) + (1 | batch)")
)

## lme4 / model.matrix column name -> patsy column name for the same formula.
## (celltype only appears without an intercept, so patsy codes it in full rank.)
patsy_name <- function(term) {
  vapply(strsplit(term, ":", fixed = TRUE), function(parts) {
    out <- vapply(parts, function(p) {
      if (p == "(Intercept)") "Intercept"
      else if (grepl("^celltype", p)) sprintf("celltype[%s]", sub("^celltype", "", p))
      else if (grepl("^trt", p)) sprintf("trt[T.%s]", sub("^trt", "", p))
      else p
    }, "")
    paste(out, collapse = ":")
  }, "")
}

## Warnings/messages of a fit, without lme4's "boundary (singular) fit" note
## (singularity is reported separately by isSingular).
clean_msgs <- function(fit, extra) {
  m <- unique(unlist(c(extra, fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)))
  m <- m[!grepl("^boundary \\(singular\\) fit", m)]
  m <- gsub("[,\n\r]+", ";", trimws(m))
  if (length(m) == 0) "" else paste(m, collapse = " | ")
}

status <- list()
for (dname in names(designs)) {
  des <- designs[[dname]]
  cells <- read.csv(file.path(here, paste0(dname, "_cells.csv")), stringsAsFactors = FALSE)
  Y <- read.csv(file.path(here, paste0(dname, "_Y.csv")), check.names = FALSE)
  stopifnot(nrow(cells) == nrow(Y))
  genes <- names(Y)
  dat <- cells
  dat$donor <- factor(dat$donor)
  dat$celltype <- factor(dat$celltype)
  dat$batch <- factor(dat$batch)
  dat$trt <- factor(dat$trt, levels = c("A", "B"))
  form <- as.formula(paste("y ~", des$fixed, "+", des$random))

  X <- model.matrix(as.formula(paste("~", des$fixed)), dat)
  terms <- colnames(X)
  pterms <- patsy_name(terms)
  write_ref(data.frame(position = seq_along(terms), term = terms, term_patsy = pterms),
            file.path(here, paste0(dname, "_terms.csv")))

  ## Contrasts: one 1-df contrast of interest, plus (for the cell-type designs) the
  ## joint F test of all celltype:trt terms.
  if (dname == "crossed") {
    L1 <- setNames(as.numeric(terms == "trtB"), terms)
    Ljoint <- NULL
    cname <- "trtB"
  } else {
    L1 <- setNames(as.numeric(terms == "celltypec1:trtB") - as.numeric(terms == "celltypec2:trtB"), terms)
    Ljoint <- diag(length(terms))[grepl(":trtB$", terms), , drop = FALSE]
    colnames(Ljoint) <- terms
    cname <- "c1B_minus_c2B"
  }
  Ltab <- data.frame(contrast = cname, t(L1), check.names = FALSE)
  if (!is.null(Ljoint)) {
    Ltab <- rbind(Ltab, data.frame(contrast = paste0("celltype_trt_all_row", seq_len(nrow(Ljoint))),
                                   Ljoint, check.names = FALSE))
  }
  write_ref(Ltab, file.path(here, paste0(dname, "_contrasts.csv")))

  for (reml in c(TRUE, FALSE)) {
    meth <- if (reml) "REML" else "ML"
    res <- list(loglik = list(), vc = list(), coef = list(), df = list(), contrast = list())
    for (g in genes) {
      dat$y <- Y[[g]]
      rb <- fit_capture(lmerTest::lmer(form, data = dat, REML = reml, control = ctrl_bobyqa))
      rn <- fit_capture(lmerTest::lmer(form, data = dat, REML = reml, control = ctrl_nlopt))
      llb <- as.numeric(logLik(rb$fit))
      lln <- as.numeric(logLik(rn$fit))
      use_b <- llb >= lln
      r <- if (use_b) rb else rn
      fit <- r$fit
      stopifnot(identical(names(fixef(fit)), terms))
      ll <- logLik(fit)
      sing <- isSingular(fit)                    # default tol = 1e-4
      msgs <- clean_msgs(fit, r$msgs)
      code <- as.integer(fit@optinfo$conv$opt)
      conv <- code == 0 && msgs == ""
      res$loglik[[g]] <- data.frame(
        gene = g, loglik = as.numeric(ll),
        criterion = if (reml) REMLcrit(fit) else deviance(fit),
        criterion_type = if (reml) "REMLcrit" else "deviance",
        optimizer = if (use_b) "bobyqa" else "nloptwrap",
        loglik_bobyqa = llb, loglik_nloptwrap = lln,
        converged = as.integer(conv), singular = as.integer(sing),
        npar = as.integer(attr(ll, "df")), nobs = as.integer(nobs(fit)),
        optimizer_code = code, feval = as.integer(fit@optinfo$feval),
        messages = msgs,
        messages_bobyqa = clean_msgs(rb$fit, rb$msgs),
        messages_nloptwrap = clean_msgs(rn$fit, rn$msgs),
        stringsAsFactors = FALSE)

      vc <- as.data.frame(VarCorr(fit))
      th <- getME(fit, "theta")
      theta <- unname(th[paste0(vc$grp, ".(Intercept)")])   # NA for Residual
      res$vc[[g]] <- data.frame(gene = g, component = vc$grp, variance = vc$vcov,
                                sd = vc$sdcor, theta = theta, stringsAsFactors = FALSE)

      ## Satterthwaite summary (lmerTest); warnings from the df computation are kept.
      sr <- fit_capture(summary(fit, ddf = "Satterthwaite"))
      cf <- sr$fit$coefficients[terms, , drop = FALSE]
      res$coef[[g]] <- data.frame(gene = g, term = terms, term_patsy = pterms,
                                  estimate = unname(fixef(fit)),
                                  se = sqrt(diag(as.matrix(vcov(fit)))),
                                  stringsAsFactors = FALSE)
      res$df[[g]] <- data.frame(gene = g, term = terms, term_patsy = pterms,
                                df = cf[, "df"], t = cf[, "t value"], p = cf[, "Pr(>|t|)"],
                                stringsAsFactors = FALSE)
      cmsg <- ""
      if (reml) {
        cr <- fit_capture(lmerTest::contest1D(fit, L1, ddf = "Satterthwaite"))
        ct <- cr$fit
        rows <- data.frame(gene = g, contrast = cname, estimate = ct[["Estimate"]],
                           se = ct[["Std. Error"]], df = ct[["df"]], t = ct[["t value"]],
                           numdf = 1L, F = ct[["t value"]]^2, p = ct[["Pr(>|t|)"]],
                           stringsAsFactors = FALSE)
        cmsg <- c(cmsg, cr$msgs)
        if (!is.null(Ljoint)) {
          jr <- fit_capture(lmerTest::contest(fit, Ljoint, joint = TRUE, ddf = "Satterthwaite"))
          jt <- jr$fit
          rows <- rbind(rows, data.frame(gene = g, contrast = "celltype_trt_all",
                                         estimate = NA_real_, se = NA_real_,
                                         df = jt[["DenDF"]], t = NA_real_,
                                         numdf = as.integer(jt[["NumDF"]]), F = jt[["F value"]],
                                         p = jt[["Pr(>F)"]], stringsAsFactors = FALSE))
          cmsg <- c(cmsg, jr$msgs)
        }
        res$contrast[[g]] <- rows
      }
      lt_msgs <- unique(c(sr$msgs, cmsg))
      lt_msgs <- gsub("[,\n\r]+", ";", lt_msgs[lt_msgs != ""])
      status[[length(status) + 1]] <- data.frame(
        design = dname, method = meth, gene = g,
        optimizer = if (use_b) "bobyqa" else "nloptwrap",
        loglik_diff = llb - lln, converged = as.integer(conv), singular = as.integer(sing),
        messages = msgs,
        messages_bobyqa = clean_msgs(rb$fit, rb$msgs),
        messages_nloptwrap = clean_msgs(rn$fit, rn$msgs),
        lmerTest_messages = paste(lt_msgs, collapse = " | "),
        stringsAsFactors = FALSE)
    }
    prefix <- file.path(here, sprintf("%s_%s_", dname, meth))
    write_ref(do.call(rbind, res$loglik), paste0(prefix, "loglik.csv"))
    write_ref(do.call(rbind, res$vc), paste0(prefix, "vc.csv"))
    write_ref(do.call(rbind, res$coef), paste0(prefix, "coef.csv"))
    write_ref(do.call(rbind, res$df), paste0(prefix, "df.csv"))
    if (reml) write_ref(do.call(rbind, res$contrast), paste0(prefix, "contrast.csv"))
    cat(sprintf("%s %s done\n", dname, meth))
  }
}
st <- do.call(rbind, status)
rownames(st) <- NULL
write_ref(st, file.path(here, "multicomp_fit_status.csv"))
writeLines(c(sprintf("R %s", getRversion()),
             sprintf("lme4 %s", packageVersion("lme4")),
             sprintf("lmerTest %s", packageVersion("lmerTest")),
             sprintf("Matrix %s", packageVersion("Matrix")),
             sprintf("minqa %s", packageVersion("minqa")),
             sprintf("nloptr %s", packageVersion("nloptr")),
             sprintf("date %s", format(Sys.Date()))),
           file.path(here, "versions.txt"))
print(aggregate(cbind(singular, converged) ~ design + method, data = st, FUN = sum))
print(table(st$design, st$optimizer))
w <- st$messages_bobyqa != "" | st$messages_nloptwrap != "" | st$lmerTest_messages != ""
print(st[w, c("design", "method", "gene", "optimizer", "messages_bobyqa",
              "messages_nloptwrap", "lmerTest_messages")], right = FALSE)
