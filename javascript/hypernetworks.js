// sd-webui-hypernetworks: tooltips for the extension's settings, editor and training tab, a "sort by
// hash" control on the Hypernetworks page, and the host's progress bar for training.
// Every global name starts with hnx.

var hnxTooltips = {
    "Default multiplier": "Strength of <hypernet:name> written without a number, and of a clicked card that has no preferred multiplier.",
    "Extra folders with hypernetworks": "More folders to list besides --hypernetwork-dir, one per line. Subfolders are included; links leading out of a folder are not.",
    "Loaded networks kept in memory": "How many networks stay loaded after they leave the prompt, so switching back is instant. Networks in use are always kept.",
    "Precision of the hypernetwork layers": "Automatic runs the networks in their own float32, like A1111. float16/bfloat16 save memory on large networks.",
    "Memory for folded weights (MiB)": "Affine networks are folded into the UNet's self-attention weights and kept on the GPU between generations (SD1.5 about 47 MiB, SDXL 391 MiB in fp16). Past the limit layers compute unfolded: the same image, a little slower. 0 never folds, -1 has no limit.",
    "Unknown network names and malformed tags": "What happens when a tag names no file or has a bad argument. The other tags still apply unless the generation is stopped.",
    "Networks made for another model family (an SD1 network on SDXL)": "A network whose text width belongs to another model family would only change the image's self-attention. Skip it, or apply it anyway.",
    "Add Hypernet hashes to infotext": "Writes 'Hypernet hashes: name: hash' so pasted parameters find the same files even when they are named differently.",
    "Always show all networks on the Hypernetworks page": "Otherwise cards of networks made for another model family than the loaded checkpoint are hidden.",
    "Block weight presets": "Your own per-block vectors, one per line as NAME: 1,1,0,... (16 values for SD1/SD2, 11 for SDXL). Use them as bw=NAME in a tag.",
    "Let A1111's own code handle <hypernet:...> tags (for comparisons)": "Tags go to A1111's built-in hypernetworks, as without this extension (its .pt files in --hypernetwork-dir, name and multiplier only). For A/B comparisons and benchmarks/host_generation.py; leave it off otherwise.",
    "Hide A1111's own hypernetwork training (Train tab)": "A1111's Create hypernetwork sub-tab and Train Hypernetwork button fail on current torch and lack the fixes of the Hypernetworks sub-tab. Reload the UI after changing this.",
    "Alias": "Another name that works in <hypernet:...>; it must not contain : < > , / or \\.",
    "Preferred multiplier": "The multiplier a click on the card inserts; 0 uses the Default multiplier setting.",
    "Activation text": "Text added to the prompt after the tag when the card is clicked.",
    "Modules (widths)": "Which attention widths get a network: the text width of the model (768 SD1, 1024 SD2, 2048 SDXL) and its self-attention widths. Preselected for the loaded checkpoint.",
    "Learning rate (schedule: 5e-5:100, 5e-6:1500, 1e-6)": "A rate, or rate:step pairs: each rate holds until its step; training ends when the list does.",
    "Clipping limit (schedule syntax)": "The limit of gradient clipping (value or norm), scheduled like the learning rate. Applied to the real (unscaled) gradients.",
    "Max steps (counting earlier sessions)": "Training stops at this step; a network already trained further is left alone.",
    "Aspect-ratio buckets": "Keep each image's shape: images are grouped by aspect ratio into batches of about width x height pixels.",
    "Keep the first N tags in place": "Shuffling and tag drop-out leave the first N comma-separated tags alone (e.g. a trigger word).",
    "Optimizer": "AdamW as A1111; AdamW8bit saves memory (bitsandbytes, CUDA); Lion wants a 3-10x smaller rate; Prodigy sets its own rate (keep it near 1.0).",
    "Rate curve": "constant follows the schedule; cosine_with_restarts decays it in cycles down to the cosine floor.",
    "Warm-up steps": "The rate rises linearly from 0 over these first steps.",
    "EMA decay (0 = off)": "Keep an exponential moving average of the weights (e.g. 0.999); saved files and previews use the average.",
    "Min-SNR gamma (0 = off)": "Weighs down the loss of easy, low-noise timesteps (5 is common); steadier training.",
    "Noise offset": "Adds a per-channel offset to the noise (e.g. 0.05) so the network can learn darker and brighter images.",
    "Held-out validation fraction": "Images kept out of training; their loss at fixed noise shows over-fitting in the chart.",
    "Gradient checkpointing (less memory, slower steps)": "Recompute the UNet's attention blocks in the backward pass: less memory, slower steps.",
    "Mixed precision": "auto: bf16 on GPUs that have it, else fp16 with a gradient scaler; none on CPU.",
    "Seed (-1 = random)": "Fixes every random choice of the run; a resumed run with the same seed continues exactly.",
    "Resume from a saved copy (path)": "A copy from the log folder; its optimizer state is used when its .optim file was saved with it."
};

function hnxApplyTooltips(root) {
    var labels = "#settings_hypernetworks span, .edit-user-metadata span, .edit-user-metadata label, #hnx_train_tab span";
    root.querySelectorAll(labels).forEach(function(node) {
        var text = (node.textContent || "").trim();
        if (hnxTooltips[text] && !node.title) {
            node.title = hnxTooltips[text];
        }
    });
}

// The host rebuilds each page's controls when the page loads and on every refresh, so the button
// is added again whenever it is missing.
function hnxAddHashSort(root) {
    ["txt2img", "img2img"].forEach(function(tabname) {
        var controls = root.querySelector("#" + tabname + "_hypernetworks_controls");
        if (!controls || controls.querySelector(".hnx-sort-hash")) {
            return;
        }
        var button = document.createElement("div");
        button.className = "extra-network-control--sort hnx-sort-hash";
        button.dataset.sortkey = "hash";
        button.title = "Sort by hash";
        button.tabIndex = 0;
        button.textContent = "#";
        button.addEventListener("click", function(event) {
            extraNetworksControlSortOnClick(event, tabname, "hypernetworks");
        });
        var direction = controls.querySelector(".extra-network-control--sort-dir");
        controls.insertBefore(button, direction || null);
    });
}

// The cards pages and the tab's lists, after a training run wrote a new network.
function hnxRefreshAfterTraining() {
    ["txt2img", "img2img"].forEach(function(tabname) {
        var refresh = gradioApp().getElementById(tabname + "_hypernetworks_extra_refresh_internal");
        if (refresh) {
            refresh.dispatchEvent(new Event("click"));
        }
    });
    var lists = gradioApp().getElementById("hnx_train_refresh");
    if (lists) {
        lists.click();
    }
}

// Runs when Train is clicked, before the request: the first input becomes the task id the host's
// progress bar follows (as start_training_textual_inversion does for A1111's own trainer).
function hnxStartTraining() {
    var id = randomId();
    var progress = gradioApp().getElementById("hnx_train_progress");
    var gallery = gradioApp().getElementById("hnx_train_gallery");
    requestProgress(id, progress, gallery, hnxRefreshAfterTraining, null);
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

onUiLoaded(function() {
    hnxAddHashSort(gradioApp());
    hnxApplyTooltips(gradioApp());
});

onAfterUiUpdate(function() {
    hnxAddHashSort(gradioApp());
    hnxApplyTooltips(gradioApp());
});
