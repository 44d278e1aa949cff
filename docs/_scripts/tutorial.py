# ruff: noqa: E402, I001
# The tutorial of the flashmm documentation, run at every docs build by
# tutorial_runner.py: each "# %% name" cell is shown in docs/tutorial.rst
# together with what it printed. Keep it small: the whole file must run in a
# few seconds. Cells whose name starts with "_" are run but not shown.

# %% _setup
import numpy as np
import pandas as pd

pd.set_option("display.width", 88)
pd.set_option("display.max_columns", 10)
pd.set_option("display.precision", 4)
np.set_printoptions(precision=4, suppress=True)

# %% simulate
from flashmm.datasets import simulate_rnaseq

adata = simulate_rnaseq(
    n_genes=400, n_cells=3000, n_samples=12, n_celltypes=3, n_de_genes=30,
    var_random_effects=0.1, seed=1,
)
print(adata)
print(pd.crosstab(adata.obs["trt"], adata.obs["sam"]).to_string())

# %% truth
truth = adata.var[["de", "beta", "de_celltype"]]
print(truth[truth["de"]].head())
print(truth.loc[truth["de"], "de_celltype"].astype(str).value_counts().sort_index())

# %% fit
from pprint import pprint

from flashmm import MultiGeneMixedLM

model = MultiGeneMixedLM.from_formula(
    "~ 0 + np.log(libsize) + cls + cls:trt", adata.obs,
    endog=adata.X, groups="sam", transform="log2p1", gene_names=adata.var_names,
)
res = model.fit()            # REML, Satterthwaite degrees of freedom
print(res)
pprint(res.exog_names, compact=True)

# %% summary
treatment = [t for t in res.exog_names if ":trt[" in t]     # the effects of interest
print(res.summary(terms=treatment))

# %% vcomp
print(res.vcomp.describe().T)
print("converged:", int(res.converged.sum()), " at the boundary (variance 0):",
      int(res.boundary.sum()))
print(res.icc.head())

# %% contrasts
contrasts = {
    "C1": "cls[C1]:trt[T.B]",                              # treatment effect in C1
    "C2": "cls[C2]:trt[T.B]",
    "C3": "cls[C3]:trt[T.B]",
    "C1_vs_C2": "cls[C1]:trt[T.B] - cls[C2]:trt[T.B]",     # difference of effects
    "average": "(cls[C1]:trt[T.B] + cls[C2]:trt[T.B] + cls[C3]:trt[T.B]) / 3",
}
test = res.t_test(contrasts)
table = test.summary_frame()
print(table.columns.tolist())
print(test.summary(top=8))

# %% fdr
hits = table[(table["padj"] < 0.05) & table["contrast"].isin(["C1", "C2", "C3"])]
true = {(g, str(c)) for g, c in truth.loc[truth["de"], "de_celltype"].items()}
found = set(hits[["gene", "contrast"]].itertuples(index=False, name=None))
print(f"{len(found)} discoveries at FDR 5%: {len(found & true)} true, "
      f"{len(found - true)} false; {len(true - found)} of {len(true)} DE genes missed")

# %% volcano
import matplotlib.pyplot as plt
import flashmm.plot

fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
flashmm.plot.volcano(test, contrast="C2", ax=axes[0], label_top=5)
flashmm.plot.qq(test.pvalue[["C1", "C2", "C3"]].to_numpy()[~truth["de"].to_numpy()], ax=axes[1])
axes[1].set_title("non-DE genes, per-cell-type effects")
fig.tight_layout()
fig.savefig("volcano_qq.png", dpi=90)

# %% df
print(test.df_denom.describe().loc[["min", "50%", "max"]])
print("n - p =", res.nobs - res.k_fe)
resid = res.t_test(contrasts, df_method="residual").summary_frame()
null = ~resid["gene"].map(truth["de"]).to_numpy()
for name, tab in [("satterthwaite", table), ("residual (n - p)", resid)]:
    rate = (tab["pvalue"].to_numpy()[null] < 0.05).mean()
    print(f"{name:>18}: {rate:.1%} of null tests with p < 0.05")

# %% blups
blups = res.random_effects["sam"]           # genes x samples
print(blups.iloc[:4, :6])
cond = res.random_effects_cov["sam"]        # their conditional variances
print(cond.iloc[:2, :6])

# %% blup_plot
sim = pd.DataFrame(adata.varm["random_effects"], index=adata.var_names,
                   columns=adata.uns["simulation"]["random_effect_samples"])
gene = res.vcomp["sam"].idxmax()
levels = [c.split("[")[-1].rstrip("]") for c in blups.columns]
fig, ax = plt.subplots(figsize=(4.2, 3.8))
ax.errorbar(sim.loc[gene, levels], blups.loc[gene], yerr=2 * np.sqrt(cond.loc[gene]),
            fmt="o", ms=4)
ax.set_xlabel("simulated effect (natural log scale)")
ax.set_ylabel("BLUP (log2(1 + count) scale)")
ax.set_title(f"{gene}: sample effects")
fig.tight_layout()
fig.savefig("blups.png", dpi=90)
print(gene, "sample variance", round(res.vcomp.loc[gene, "sam"], 4))

# %% gene
top = table[table["contrast"] == "C2"].sort_values("pvalue")["gene"].iloc[0]
print(res.gene(top).summary(df_method="normal"))

# %% statsmodels
import warnings
import statsmodels.api as sm

cells = adata.obs.assign(y=np.log2(1 + adata[:, top].X.toarray().ravel()))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")     # statsmodels' convergence chatter
    fit = sm.MixedLM.from_formula("y ~ 0 + np.log(libsize) + cls + cls:trt", cells,
                                  groups="sam").fit(reml=True)
print(fit.summary())

# %% compare
ours = res.gene(top)
print(pd.DataFrame({"flashmm": ours.fe_params, "statsmodels": fit.fe_params}))
print(f"llf: flashmm {ours.llf:.6f}  statsmodels {fit.llf:.6f}")

# %% satterthwaite_gene
print(res.gene(top).summary())

# %% gene_tests
one = res.gene(top)
print(one.df_terms.round(1).to_dict())
print(one.t_test({"C2": "cls[C2]:trt[T.B]", "C1_vs_C2": contrasts["C1_vs_C2"]}).summary_frame())
print(one.wald_test(["cls[C1]:trt[T.B]", "cls[C2]:trt[T.B]", "cls[C3]:trt[T.B]"]))

# %% anndata
import flashmm

flashmm.write_results(adata, res, contrasts=contrasts)
pprint(sorted(k for k in adata.varm if k.startswith("flashmm")), compact=True)
print(flashmm.get_results_df(adata, contrast="C2").sort_values("pvalue").head(3))
